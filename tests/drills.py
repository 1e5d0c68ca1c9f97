"""Fault drills shared by tests: a real job process killed at a chosen moment, and the
``engine.hooks`` that make a scoring actor or a training worker die inside Ray.

The hooks are installed in every Ray process of the test session (tests/conftest.py sets
``WINNOW_HOOKS=tests.drills`` before Ray starts; a job run by hand takes the same variable):

- ``touch WORK/chaos-kill-actor`` (WORK: a score run's ``_partial``): the next scoring actor
  that receives a block deletes the file and exits abruptly; Ray restarts it and retries the
  block.
- ``touch OUT/_partial/chaos-fail-worker``: rank 0 of a training run exits after its next
  checkpoint; Ray Train restarts the worker group from it. In a run in the job's own process
  (``--executor in-process``) the loop raises instead, and the in-process runner restarts it
  from that checkpoint.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

KILL_ACTOR = "chaos-kill-actor"
FAIL_WORKER = "chaos-fail-worker"


def install(on) -> None:
    on("scoring.call", _kill_scoring_actor)
    on("train.checkpointed", _fail_training_worker)


def _kill_scoring_actor(actor, batch) -> None:
    if not actor.work_dir:
        return
    try:
        os.remove(Path(actor.work_dir) / KILL_ACTOR)
    except FileNotFoundError:
        return  # no drill, or another actor took it
    os._exit(17)


class DrillFailure(RuntimeError):
    """The in-process training drill's error."""


def _fail_training_worker(work_dir: str, epoch: int, in_process: bool = False) -> None:
    flag = Path(work_dir) / FAIL_WORKER
    if not flag.exists():
        return
    flag.unlink(missing_ok=True)
    if in_process:
        print(f"train: chaos drill, the loop fails after pass {epoch}", flush=True)
        raise DrillFailure(f"chaos drill after pass {epoch}")
    import ray.train

    # wait until the controller has registered this pass's checkpoint (reports are processed
    # asynchronously), so the drill tests resuming rather than a lost report
    ray.train.get_all_reported_checkpoints(timeout_s=60)
    print(f"train: chaos drill, rank 0 exits after pass {epoch}", flush=True)
    os._exit(17)


def kill_when(argv: list, env: dict, cwd, ready: Callable[[], bool], timeout: float = 300) -> None:
    """Start ``argv``, SIGKILL it as soon as ``ready()`` holds (checked every 50 ms); fails if
    the process ends first."""
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and not ready() and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, "the job ended before it could be killed:\n" + proc.stdout.read()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
