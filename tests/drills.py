"""Fault drills shared by tests: a real job process killed at a chosen moment."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Callable


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
