"""A job's console shows Winnow's lines; Ray's own output goes to the run directory's
``logs/ray.log`` (``--verbose`` shows it); an error is still one line on the console.

Each job runs as a real process with its own private Ray (the redirection is of the process's
file descriptor 2, which Ray's processes and its C++ core write to): about 20 s each on 2 cores.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# lines only Ray's internals print: Train's controller and per-report lines, Python logging's
# "INFO file.py:123 --" records (Ray Data, Ray core), the core worker's C++ log lines, Ray's start
RAY_LINE = re.compile(r"Reporting training result|TrainController|TrainingReport\(|\bINFO \S+\.py:\d+ --|"
                      r"core_worker\.cc|Started a local Ray instance|\[repeated \d+x across cluster\]")

pytestmark = pytest.mark.ray


def _job(tmp_path: Path, *argv, env=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    env.pop("RAY_ADDRESS", None)  # its own private Ray, as a user's job has
    env["HOME"] = str(tmp_path / "home")  # the rescued logs and the token under a fresh cache
    return subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def _train(tmp_path: Path, out: Path, *extra, env=None) -> subprocess.CompletedProcess:
    return _job(tmp_path, "jobs.train", "--data", "digits", "--epochs", "2", "--batch-size", "128",
                "--executor", "ray-train", "--out", str(out), *extra, env=env)


def test_ray_output_goes_to_the_run_log_and_verbose_brings_it_back(tmp_path):
    out = tmp_path / "quiet"
    p = _train(tmp_path, out)
    console = p.stdout + p.stderr
    assert p.returncode == 0, console
    assert not RAY_LINE.search(console), console
    assert "\x1b[" not in console  # no colour codes off a terminal
    assert f"ray: Ray's own output goes to {out / 'logs' / 'ray.log'}" in p.stdout
    assert re.search(r"train: pass 1/2 loss \S+ test-acc \S+ \(about \d+ s left\)", p.stdout), p.stdout
    assert "train: pass 2/2" in p.stdout and "test accuracy" in p.stdout
    log = (out / "logs" / "ray.log").read_text()
    assert log.startswith("==== jobs.train pid ")
    assert "Reporting training result" in log and "TrainController" in log

    loud = tmp_path / "verbose"
    p = _train(tmp_path, loud, "--verbose")
    console = p.stdout + p.stderr
    assert p.returncode == 0, console
    assert "Reporting training result" in console and "TrainController" in console
    assert "train: pass 2/2" in console and not (loud / "logs").exists()


def test_a_failed_job_is_one_console_line_naming_its_ray_log(tmp_path):
    """The worker dies with no restart left: one error line on the console, no traceback, no
    Ray line; it names the Ray log, which holds what the controller said: moved to the cache,
    since the failed job leaves nothing it made in the run directory but its checkpoints."""
    out = tmp_path / "failed"
    (out / "_partial").mkdir(parents=True)
    (out / "_partial" / "chaos-fail-worker").touch()
    p = _train(tmp_path, out, "--max-failures", "0", env={"WINNOW_HOOKS": "tests.drills"})
    assert p.returncode == 1, p.stdout + p.stderr
    errors = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(errors) == 1 and errors[0].startswith("jobs.train: error: training failed after 0 restart(s)"), \
        p.stderr
    assert "Traceback" not in p.stderr and not RAY_LINE.search(p.stdout + p.stderr)
    kept = re.search(r"\(Ray's log: (\S+)\)", errors[0])
    assert kept and Path(kept.group(1)).parent == tmp_path / "home" / ".cache" / "winnow" / "logs", errors[0]
    assert "TrainController" in Path(kept.group(1)).read_text()
    assert not (out / "logs").exists() and any((out / "_partial").iterdir())


def test_the_log_of_a_run_directory_removed_by_its_failure_is_kept_in_the_cache(tmp_path, monkeypatch):
    """What reached file descriptor 2 inside the block is in the log; a failure that removed the
    run directory (output_dir does for a directory the job created) leaves a copy under the
    cache's logs, which ``last_log`` names; the console's descriptor is back afterwards."""
    import shutil

    from engine import console

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("WINNOW_CACHE", raising=False)
    monkeypatch.setattr(console, "_rescued", [])
    run = tmp_path / "run"
    before = os.fstat(2).st_ino
    with pytest.raises(RuntimeError):
        with console.ray_logs_to(run / console.LOG_NAME, "jobs.x") as log:
            assert log == run / "logs" / "ray.log"
            os.write(2, b"a line from Ray's core\n")
            print("ours", file=console.stderr(), flush=True)
            shutil.rmtree(run)
            raise RuntimeError("the job failed")
    assert os.fstat(2).st_ino == before and console.stderr() is sys.stderr
    kept = Path(console.last_log())
    assert kept.parent == tmp_path / "home" / ".cache" / "winnow" / "logs" and kept.name.startswith("jobs.x-")
    text = kept.read_text()
    assert text.startswith("==== jobs.x pid ") and "a line from Ray's core" in text and "ours" not in text


def test_verbose_leaves_the_console_alone(tmp_path):
    from engine import console

    console.set_verbose(True)
    try:
        with console.ray_logs_to(tmp_path / console.LOG_NAME) as log:
            assert log is None
    finally:
        console.set_verbose(False)
    assert not (tmp_path / "logs").exists()
