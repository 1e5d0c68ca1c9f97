"""Jobs run unchanged under ``ray job submit`` against a cluster: a local head started with
``ray start --head`` (own temp dir and ports, loopback dashboard, token authentication as
cluster.yaml sets it up), ``jobs.pipeline --smoke-test`` submitted with ``--working-dir .`` and
the token, its status and artifacts checked; a submission without the token is refused. The
head is stopped by the PIDs it started, never by ``ray stop``."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT

RAY = Path(sys.executable).with_name("ray")


def free_ports(n):
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _pids_under(temp_dir: str):
    """PIDs whose command line names our head's temp dir (Linux /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if temp_dir.encode() in (d / "cmdline").read_bytes():
                    out.append(int(d.name))
            except OSError:
                continue
    return [p for p in out if p != os.getpid()]


@pytest.fixture(scope="module")
def ray_head():
    pytest.importorskip("ray.dashboard.optional_deps", reason="ray job submit needs ray[default]")
    temp_dir = tempfile.mkdtemp(prefix="wjs-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    token_dir = tempfile.mkdtemp(prefix="wjs-token-")  # 0700; not temp_dir, which Ray makes world-writable
    token = Path(token_dir) / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    gcs, dash, client, agent, metrics, env_agent, grpc, nm, om = free_ports(9)
    # the test's interpreter first on PATH (CI runs .venv/bin/python without activating the venv);
    # token authentication on the head and for every client, as cluster.yaml and the README say
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN", None)
    cmd = [str(RAY), "start", "--head", "--block", f"--temp-dir={temp_dir}", f"--port={gcs}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
           f"--dashboard-agent-listen-port={agent}", f"--metrics-export-port={metrics}",
           f"--runtime-env-agent-port={env_agent}", f"--dashboard-agent-grpc-port={grpc}",
           f"--node-manager-port={nm}", f"--object-manager-port={om}", "--min-worker-port=0", "--max-worker-port=0",
           "--num-cpus=2", "--include-dashboard=true", "--disable-usage-stats"]
    head = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        from urllib.request import Request, urlopen

        version = Request(f"{address}/api/version", headers={"Authorization": f"Bearer {token.read_text()}"})
        while True:
            try:
                with urlopen(version, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if head.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"ray head did not come up: {head.stdout.read() if head.poll() is not None else 'timeout'}")
            time.sleep(1)
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:  # a graceful stop takes ~10 s on 2 cores; the daemons left are killed by PID below
            head.wait(timeout=3)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        for pid in _pids_under(temp_dir):  # daemons that left the group: stop them by PID
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)
        shutil.rmtree(token_dir, ignore_errors=True)


def status_of(address: str, submission_id: str, env: dict) -> str:
    from ray.job_submission import JobSubmissionClient

    bearer = {"Authorization": f"Bearer {Path(env['RAY_AUTH_TOKEN_PATH']).read_text().strip()}"}
    return str(JobSubmissionClient(address, headers=bearer).get_job_status(submission_id).value)


def submit_job(ray_head, sub_id: str, argv: list, timeout: int):
    """``ray job submit`` of ``python argv...`` from the repository; returns (address,
    completed process, its output)."""
    address, env = ray_head
    submit = subprocess.run(
        [str(RAY), "job", "submit", "--working-dir", ".", "--submission-id", sub_id, "--", sys.executable, *argv],
        cwd=ROOT, env={**env, "RAY_ADDRESS": address}, capture_output=True, text=True, timeout=timeout)
    return address, submit, submit.stdout + submit.stderr


@pytest.mark.slow  # 100 s on 2 cores; test_score_via_ray_job_submit covers ray job submit by default
def test_pipeline_smoke_test_via_ray_job_submit(ray_head, tmp_path):
    out = tmp_path / "pipeline"
    sub_id = f"winnow-test-{os.getpid()}"
    address, submit, log = submit_job(ray_head, sub_id, ["-m", "jobs.pipeline", "--smoke-test", "--out", str(out)],
                                      900)
    assert submit.returncode == 0, log[-3000:]
    assert status_of(address, sub_id, ray_head[1]) == "SUCCEEDED"
    # the job ran on the cluster (its driver connected to the head, not a private local Ray)
    assert "pipeline finished" in log, log[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["rows"] and all(0 < r["test_accuracy"] <= 1 for r in results["rows"])
    assert (out / "score" / "scores.parquet").is_file()
    assert not (out / "score" / "_partial").exists()


def test_score_via_ray_job_submit(ray_head, tmp_path):
    """A scoring job submitted to the cluster: proxies as Ray tasks and Ray Data scoring actors
    on the head, the score table written, nothing partial left."""
    out = tmp_path / "score"
    sub_id = f"winnow-score-{os.getpid()}"
    address, submit, log = submit_job(ray_head, sub_id, ["-m", "jobs.score", "--data", "digits", "--scores",
                                                         "el2n,forgetting", "--seeds", "1", "--epochs", "1",
                                                         "--out", str(out)], 600)
    assert submit.returncode == 0, log[-3000:]
    assert status_of(address, sub_id, ray_head[1]) == "SUCCEEDED"
    table = pq.read_table(out / "scores.parquet")
    assert table.num_rows == 1438 and {"sample_id", "label", "el2n", "forgetting"} <= set(table.column_names)
    assert not (out / "_partial").exists()


def test_submission_without_the_token_is_refused(ray_head, tmp_path):
    """The head runs with token authentication: ``ray job submit`` without the token (no
    RAY_AUTH_MODE, nothing in ~/.ray) is refused and nothing runs."""
    address, env = ray_head
    env = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    env.update(RAY_ADDRESS=address, HOME=str(tmp_path))
    marker = tmp_path / "ran"
    sub = subprocess.run([str(RAY), "job", "submit", "--no-wait", "--", "touch", str(marker)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert sub.returncode != 0
    assert "401" in sub.stdout + sub.stderr or "uthentication" in sub.stdout + sub.stderr, sub.stderr[-2000:]
    time.sleep(2)
    assert not marker.exists()


def test_job_waiting_for_gpus_says_so_and_gives_up(ray_head, tmp_path):
    """On a cluster (the head has no GPU and no autoscaler), ``jobs.train --gpus 1`` announces
    what it waits for and gives up after WINNOW_RESOURCE_WAIT_S with one line, instead of
    waiting forever; the setting travels in the submission's runtime env."""
    address, env = ray_head
    env = {**env, "RAY_ADDRESS": address}
    sub_id = f"winnow-wait-{os.getpid()}"
    t0 = time.time()
    subprocess.run([str(RAY), "job", "submit", "--working-dir", ".", "--submission-id", sub_id,
                    "--runtime-env-json", json.dumps({"env_vars": {"WINNOW_RESOURCE_WAIT_S": "4"}}), "--",
                    sys.executable, "-m", "jobs.train", "--data", "digits", "--epochs", "1", "--gpus", "1",
                    "--out", str(tmp_path / "t")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert time.time() - t0 < 120
    assert status_of(address, sub_id, ray_head[1]) == "FAILED"
    logs = subprocess.run([str(RAY), "job", "logs", sub_id], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60).stdout
    assert "waiting for 1 x 2 CPU, 1 GPU (--workers 1 with --gpus 1" in logs, logs[-2000:]
    assert "giving up after 4 s (WINNOW_RESOURCE_WAIT_S)" in logs
    assert "jobs.train: error: --workers 1 with --gpus 1" in logs and "did not provide 1 x" in logs
    assert "Traceback" not in logs and not (tmp_path / "t" / "metrics.json").exists()


def test_failed_job_reports_failure(ray_head, tmp_path):
    address, env = ray_head
    env = {**env, "RAY_ADDRESS": address}
    sub_id = f"winnow-bad-{os.getpid()}"
    subprocess.run([str(RAY), "job", "submit", "--working-dir", ".", "--submission-id", sub_id, "--",
                    sys.executable, "-m", "jobs.select", "--scores", str(tmp_path / "missing.parquet"), "--selector",
                    "random", "--fraction", "0.5", "--out", str(tmp_path / "m.parquet")],
                   cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert status_of(address, sub_id, ray_head[1]) == "FAILED"
    logs = subprocess.run([str(RAY), "job", "logs", sub_id], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60).stdout
    assert "jobs.select: error:" in logs and "Traceback" not in logs, logs[-2000:]
    assert not (tmp_path / "m.parquet").exists()
