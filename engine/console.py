"""What a job's console shows: Winnow's own lines, not Ray's.

Ray, Ray Data, Ray Train and Tune write their internals to the driver's standard error: the
Python loggers' handlers (Ray Data's progress, "Started a local Ray instance", Train's
"Reporting training result"), the C++ core worker's warnings (written to file descriptor 2
directly), and the standard error of every worker process that Ray forwards to the driver.
``ray_logs_to(path)`` points file descriptor 2 at ``path`` (``RUN/logs/ray.log``, appended
to by every invocation) for the life of a job's Ray session, so all of it lands there whatever
wrote it, and Winnow's own lines, which go to standard output, stay on the console. Winnow's own
standard-error lines inside the session (a kept partial run, a warning for the user) go through
``stderr()``, the console's standard error. ``--verbose`` (every job's flag, ``set_verbose``)
leaves the descriptors alone: everything is on the console as Ray prints it.

A failed job leaves no file it created in its run directory (``engine.rundir.output_dir``
removes the directory it made): a log it created is moved to ``~/.cache/winnow/logs/`` and
named by the job's one error line (``last_log``); one appended to in an earlier run's
``logs/`` stays there, named the same way.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Iterator, Optional, TextIO

LOG_NAME = "logs/ray.log"

_verbose = False
_console_err: Optional[TextIO] = None
_rescued: list = []


def set_verbose(on: bool) -> None:
    global _verbose
    _verbose = bool(on)


def verbose() -> bool:
    return _verbose


def stderr() -> TextIO:
    """Where Winnow's own standard-error lines go: the console's, also while Ray's are sent to
    the run's log."""
    return _console_err or sys.stderr


def last_log() -> Optional[str]:
    """The log of this process's last job that failed inside its Ray session (a copy under the
    cache when its run directory went away with the failure), if any."""
    return _rescued[-1] if _rescued else None


def forget_log() -> None:
    """A new job starts (``engine.entry.run``): no earlier job's log is named by its errors."""
    _rescued.clear()


@contextlib.contextmanager
def ray_logs_to(path: Path, job: str = "job") -> Iterator[Optional[Path]]:
    """Send this process's file descriptor 2 (and so its children's, and every line Ray writes
    there) to ``path`` for the block; yields the path, or None when verbose or already
    redirected (nested sessions share the outer log)."""
    global _console_err
    if _verbose or _console_err is not None:
        yield None
        return
    path = Path(path)
    created = not path.parent.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    log = open(path, "a+b", buffering=0)
    log.write(f"==== {job} pid {os.getpid()} {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
    sys.stderr.flush()
    saved = os.dup(2)
    _console_err = os.fdopen(os.dup(saved), "w", buffering=1)
    os.dup2(log.fileno(), 2)
    try:
        yield path
    except BaseException:
        _rescue(log, path, job, created)
        raise
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        _console_err.close()
        _console_err = None
        log.close()


def _rescue(log, path: Path, job: str, created: bool) -> None:
    """The job failed. A log in a ``logs`` directory an earlier run made stays there; one this
    job created goes, like everything else a failed job made, and so does one whose run
    directory the failure removed: what the still-open log holds is copied under the cache's
    logs first."""
    if path.exists() and not created:
        _rescued.append(str(path))
        return
    with contextlib.suppress(OSError):
        from engine.storage import cache_root

        keep = cache_root() / "logs" / f"{job}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-ray.log"
        keep.parent.mkdir(parents=True, exist_ok=True)
        with open(log.fileno(), "rb", closefd=False) as src, open(keep, "wb") as dst:
            src.seek(0)
            dst.write(src.read())
        _rescued.append(str(keep))
        path.unlink(missing_ok=True)
        path.parent.rmdir()
