"""One owner per run directory.

A job that writes a run directory holds ``RUN/.winnow-lock`` while it runs: an exclusive
``flock`` on the file, which also names the holder (job, pid, host, start time, command). A
second job on the same directory is refused with one line naming the holder, before it reads
or removes anything there (``--fresh`` included). The kernel drops the lock when its process
dies however it dies, so a lock file left by a killed run is taken over, with a line saying
whose it was. A run on an ``s3://`` ``--out`` locks its local staging directory: two runs of
the same URI on one machine exclude each other; across machines the store cannot lock.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

from engine.errors import ConfigError

LOCK_NAME = ".winnow-lock"


def _describe(holder: dict) -> str:
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"{holder.get('job', '?')} (pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {when})"


def _read_holder(fd: int) -> Optional[dict]:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 1 << 16)
    if not raw.strip():
        return None
    try:
        holder = json.loads(raw.decode("utf-8", "replace"))
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


@contextlib.contextmanager
def run_lock(run_dir: str | Path, job: str, say=None) -> Iterator[Path]:
    """Hold the run directory's lock for the block (creating the directory if needed, and
    removing it again if it was created here and is left empty). Raises ``ConfigError`` when
    another live process holds it."""
    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {str(run_dir)!r} exists and is not a directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd) or {}
            raise ConfigError(f"--out {str(run_dir)!r} is in use by {_describe(holder)}; wait for it to finish or "
                              f"stop it, or use another --out") from None
        previous = _read_holder(fd)
        if previous is not None:
            say(f"{job}: took over the lock of {_describe(previous)} on {run_dir}: that process is gone")
        me = {"job": job, "pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
              "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(me).encode())
        os.fsync(fd)
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)  # while still holding it: a waiting run then locks a fresh file
    finally:
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                run_dir.rmdir()  # only if empty: nothing but the lock was ever written
