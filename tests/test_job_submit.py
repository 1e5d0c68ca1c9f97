"""Jobs run unchanged under ``ray job submit`` against a cluster: a local head started with
``ray start --head`` (own temp dir and ports, loopback dashboard), ``jobs.pipeline
--smoke-test`` submitted with ``--working-dir .``, its status and artifacts checked. The head
is stopped by the PIDs it started, never by ``ray stop``."""
from __future__ import annotations

import json
import os
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
    gcs, dash, client, agent, metrics, env_agent, grpc, nm, om = free_ports(9)
    # the test's interpreter first on PATH (CI runs .venv/bin/python without activating the venv)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
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
        from urllib.request import urlopen

        while True:
            try:
                with urlopen(f"{address}/api/version", timeout=2) as r:
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


def status_of(address: str, submission_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return str(JobSubmissionClient(address).get_job_status(submission_id).value)


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
    assert status_of(address, sub_id) == "SUCCEEDED"
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
    assert status_of(address, sub_id) == "SUCCEEDED"
    table = pq.read_table(out / "scores.parquet")
    assert table.num_rows == 1438 and {"sample_id", "label", "el2n", "forgetting"} <= set(table.column_names)
    assert not (out / "_partial").exists()


def test_failed_job_reports_failure(ray_head, tmp_path):
    address, env = ray_head
    env = {**env, "RAY_ADDRESS": address}
    sub_id = f"winnow-bad-{os.getpid()}"
    subprocess.run([str(RAY), "job", "submit", "--working-dir", ".", "--submission-id", sub_id, "--",
                    sys.executable, "-m", "jobs.select", "--scores", str(tmp_path / "missing.parquet"), "--selector",
                    "random", "--fraction", "0.5", "--out", str(tmp_path / "m.parquet")],
                   cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert status_of(address, sub_id) == "FAILED"
    logs = subprocess.run([str(RAY), "job", "logs", sub_id], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60).stdout
    assert "jobs.select: error:" in logs and "Traceback" not in logs, logs[-2000:]
    assert not (tmp_path / "m.parquet").exists()
