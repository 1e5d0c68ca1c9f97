"""One owner per run directory, and clean stops (issue 29, slice 4).

A second run on a live run's --out is refused in one line naming the holder before it touches
anything (before this, it "resumed" from the first run's live _partial, and --fresh deleted it);
a lock left by a dead process is taken over with a line; SIGINT and SIGTERM stop a job with one
"interrupted; rerun the same command to resume" line and exit 130 / 143, _partial kept, no
traceback or native dump (before: exit 1 with no line for SIGINT, 134 and a dump for SIGTERM)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.errors import ConfigError
from engine.runlock import LOCK_NAME, run_lock
from tests.conftest import ROOT


def test_lock_names_its_holder_and_goes_away(tmp_path):
    out = tmp_path / "run"
    with run_lock(out, "jobs.score") as path:
        holder = json.loads(path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        assert holder["job"] == "jobs.score" and abs(holder["started"] - time.time()) < 60
        with pytest.raises(ConfigError, match=rf"--out '{out}' is in use by jobs.score \(pid {os.getpid()} on host "
                                              rf"{socket.gethostname()}, started 20\d\d-"):
            with run_lock(out, "jobs.train"):
                pass
    assert not out.exists()  # created here and left empty: removed


def test_existing_directory_and_its_contents_are_kept(tmp_path):
    out = tmp_path / "run"
    (out / "_partial").mkdir(parents=True)
    with run_lock(out, "jobs.train"):
        pass
    assert (out / "_partial").is_dir() and not (out / LOCK_NAME).exists()


def test_lock_of_a_dead_process_is_taken_over(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"job": "jobs.score", "pid": 4194301, "host": "gone-host",
                                             "started": 1.0e9}))
    said = []
    with run_lock(out, "jobs.score", say=said.append):
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert len(said) == 1 and "took over the lock of jobs.score (pid 4194301 on host gone-host" in said[0]
    assert "that process is gone" in said[0]


def test_lock_held_by_another_process_is_refused(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", f"""
import time
from engine.runlock import run_lock
with run_lock({str(out)!r}, "jobs.sweep"):
    print("held", flush=True)
    time.sleep(60)
"""], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=rf"in use by jobs.sweep \(pid {holder.pid} on host"):
            with run_lock(out, "jobs.sweep"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with run_lock(out, "jobs.sweep"):  # the kernel dropped the killed holder's lock: taken over
        pass


@pytest.mark.parametrize("job", ["score", "train"])
def test_second_run_on_a_live_out_is_refused_before_touching_it(tmp_path, run_job, job):
    from jobs import score, train

    out = tmp_path / "run"
    (out / "_partial").mkdir(parents=True)
    (out / "_partial" / "work-of-the-first-run").write_text("x")
    with run_lock(out, "jobs.score"):
        t0 = time.time()
        code, _, err = run_job(score if job == "score" else train,
                               ["--data", "digits", "--epochs", "1", "--out", out, "--fresh"])
    assert code == 2 and f"--out '{out}' is in use by jobs.score (pid {os.getpid()}" in err, err
    assert "Traceback" not in err and "--fresh: removed" not in err and time.time() - t0 < 30
    assert (out / "_partial" / "work-of-the-first-run").read_text() == "x"  # --fresh did not run


def _start(argv, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0",
               WINNOW_RAY_TMPDIR=str(Path("/tmp") / f"wrl-{os.getpid()}"))
    return subprocess.Popen([sys.executable, "-m", *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _signal_after(proc, needle: str, sig: int, timeout: float = 240) -> str:
    """Read the job's output until ``needle``, send ``sig``, return all it printed."""
    lines, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            proc.send_signal(sig)
            break
    try:
        rest, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        rest, _ = proc.communicate()
    return "".join(lines) + rest


@pytest.mark.ray
@pytest.mark.timeout(400)
@pytest.mark.parametrize("argv, needle, sig, code", [
    (["jobs.score", "--data", "digits", "--scores", "el2n,forgetting", "--seeds", "3", "--epochs", "6"],
     "stage proxies:", signal.SIGTERM, 143),
    (["jobs.train", "--data", "digits", "--epochs", "300"], "train: pass 2/", signal.SIGINT, 130),
])
def test_signals_stop_a_job_cleanly(ray_local, tmp_path, argv, needle, sig, code):
    """``ray_local``: another Ray runs on the machine meanwhile, as another job's would (Ray's own
    processes in the job must still find their own cluster, not fail on "multiple instances")."""
    out = tmp_path / "run"
    proc = _start([*argv, "--out", str(out)], tmp_path)
    log = _signal_after(proc, needle, sig)
    assert needle in log, log[-3000:]
    assert proc.returncode == code, log[-3000:]
    name = signal.Signals(sig).name
    assert f"{argv[0]}: interrupted ({name}); rerun the same command to resume" in log, log[-3000:]
    assert "Traceback" not in log and "*** " not in log and "Fatal Python" not in log, log[-3000:]
    assert any((out / "_partial").iterdir()), "the work done so far is kept for the rerun"
    assert not (out / LOCK_NAME).exists()
    assert not (out / ("scores.parquet" if argv[0] == "jobs.score" else "metrics.json")).exists()
