"""How a command-line job runs: its flags parsed, its errors and signals turned into one line.

A user error (``WinnowError``, also when raised inside a Ray task or actor) ends with one
line ``<job>: error: <message>`` on stderr and exit status 2 (1 for a ``RunFailedError``: the
cluster, not the input, failed); SIGINT or SIGTERM ends with one "interrupted; rerun the same
command to resume" line and exit status 130 or 143.
Either way no output file is left behind: artifacts are written atomically, and a run
directory this invocation created is removed again when the job fails.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from typing import Callable, Iterator, Optional, Sequence

from engine.errors import one_line, user_error


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM: unwinds the job like Ctrl-C (every ``finally`` runs: Ray shut down,
    ``_partial`` kept, no half-written artifact), then exits 128 + the signal's number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_received: list = []  # the signal that stopped the job, if one did


@contextlib.contextmanager
def _stop_cleanly_on_signals(job: str) -> Iterator[None]:
    """SIGINT and SIGTERM raise ``Interrupted`` in the main thread once; a second signal while
    the job is already stopping is reported and otherwise ignored, so the clean-up finishes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopping = []

    def handler(signum, frame):
        if stopping:
            print(f"{job}: already stopping (cleaning up); SIGKILL to stop at once", file=sys.stderr, flush=True)
            return
        stopping.append(signum)
        _received[:] = [signum]  # Ray's C++ waits may turn the exception into a plain KeyboardInterrupt
        raise Interrupted(signum)

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    _received.clear()
    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h if h is not None else signal.SIG_DFL)


def run(job: str, main: Callable[[Sequence[str]], None], argv: Optional[Sequence[str]] = None) -> int:
    """Run ``main(argv)`` and turn user errors into exit status 2 with one message, and SIGINT /
    SIGTERM into one line and exit status 130 / 143."""
    from engine.console import forget_log

    forget_log()
    try:
        with _stop_cleanly_on_signals(job):
            main(sys.argv[1:] if argv is None else list(argv))
        return 0
    except SystemExit as exc:  # argparse: --help (0) or a bad flag (2, message already printed)
        return exc.code if isinstance(exc.code, int) else 2
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else (_received[0] if _received else signal.SIGINT)
        print(f"{job}: interrupted ({signal.Signals(signum).name}); rerun the same command to resume (no finished "
              f"artifact was written)", file=sys.stderr, flush=True)
        return 128 + int(signum)
    except Exception as exc:  # any error: re-raised unless it is a user error
        err = user_error(exc)
        if err is None:
            raise
        from engine.console import last_log

        where = _log_remote_traceback(job, exc, err)
        log = last_log()
        print(f"{job}: error: {one_line(err)}" + (f" (traceback: {where})" if where else "")
              + (f" (Ray's log: {log})" if log and getattr(err, "exit_code", 2) != 2 else ""), file=sys.stderr)
        return getattr(err, "exit_code", 2)


def _log_remote_traceback(job: str, exc: BaseException, err: BaseException) -> Optional[str]:
    """An error that came out of a Ray task, actor or worker: its whole chain of tracebacks
    (the remote one included) goes to ``~/.cache/winnow/logs/<job>-<time>-<pid>.log``, whose
    path the one console line names. The run directory cannot hold it: a failed job leaves no
    run directory it created. Errors raised in the driver need no log (the line says it all)."""
    import time
    import traceback

    if err is exc:
        return None
    try:
        from engine.storage import cache_root

        logs = cache_root() / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        path = logs / f"{job}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        path.write_text("".join(traceback.format_exception(exc)))
        return str(path)
    except OSError:
        return None


def entry(job: str, main: Callable[[Sequence[str]], None]) -> None:
    sys.exit(run(job, main))


class Parser(argparse.ArgumentParser):
    """argparse that exits with status 2 and one line (no usage dump) on a bad flag, and gives
    every job ``--verbose`` (``engine.console``: Ray's own output on the console instead of the
    run directory's ``logs/ray.log``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--verbose", action="store_true",
                          help="show Ray's, Ray Data's, Ray Train's and Tune's own output on the console (by default "
                               "it goes to OUT/logs/ray.log and the console shows Winnow's lines)")

    def parse_args(self, args=None, namespace=None):
        from engine import console

        ns = super().parse_args(args, namespace)
        console.set_verbose(ns.verbose)
        return ns

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")
