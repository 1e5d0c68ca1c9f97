"""Errors that are part of Winnow's interface.

Every problem a user can cause (unknown name, bad fraction, malformed file, ids that do not
match) is raised as a :class:`WinnowError` subclass with a message that names what is wrong.
The job CLIs catch exactly these, print the message and exit with status 2; anything else is
a bug and keeps its traceback.
"""
import re
from typing import Optional


class WinnowError(Exception):
    """Base class of every user-facing error."""


class ConfigError(WinnowError, ValueError):
    """A flag, config field or name is invalid."""


class DataError(WinnowError, ValueError):
    """Input data (images, labels, ids, score tables, manifests) is malformed."""


class RefusedFileError(DataError):
    """A checkpoint, proxy or cache file holds something other than tensors and plain values (a
    planted or foreign pickle). It was not executed; Winnow never loads code from a file."""


class DamagedFileError(DataError):
    """A checkpoint, proxy or cache file is truncated or does not have the layout Winnow writes."""


class WriteFailedError(WinnowError, OSError):
    """An output could not be written (disk full, permissions changed under a running job).
    Nothing half-written is left: the temporary file is removed."""


class RunFailedError(WinnowError, RuntimeError):
    """A distributed run failed for a reason outside the user's input (a worker died more
    often than the configured restarts allow). Jobs exit with status 1 and say how to resume."""

    exit_code = 1


class ResourcesUnavailableError(WinnowError, RuntimeError):
    """A cluster did not provide the nodes a job needs within the configured wait. Exit 1."""

    exit_code = 1


def _is_ray_wrapper(exc: BaseException) -> bool:
    """Ray's wrappers of a remote error (``RayTaskError`` and the dual classes it builds, which
    derive from the error's own class too, with the remote traceback as their message;
    ``UserCodeException``, Ray Data's wrapper of a failing UDF)."""
    return any(c.__module__.split(".")[0] == "ray" for c in type(exc).__mro__)


def _inner(exc: BaseException) -> list:
    """The errors ``exc`` wraps: Ray's ``cause``, Ray Train's per-worker failures, Python's
    ``__cause__`` and ``__context__``."""
    out = [getattr(exc, "cause", None)]
    out += list((getattr(exc, "worker_failures", None) or {}).values())  # Ray Train's WorkerGroupError
    out += [exc.__cause__, exc.__context__]
    return [e for e in out if isinstance(e, BaseException)]


def user_error(exc: BaseException) -> Optional[WinnowError]:
    """The WinnowError behind ``exc``, through every wrapper Ray puts around an error raised in
    a task, an actor, a Ray Data UDF or a Ray Train worker; None when there is none (a bug).
    Ray re-raises a remote error as a class deriving from both ``RayTaskError`` and the error's
    own class, whose message is the remote traceback: the original inside it is preferred."""
    found, seen, todo = [], set(), [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, WinnowError):
            found.append(e)
        todo.extend(_inner(e))
    plain = [e for e in found if not _is_ray_wrapper(e)]
    return (plain or found or [None])[0]


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def one_line(err: BaseException) -> str:
    """``err``'s message as one line without colour codes. A message that is a remote traceback
    (a Ray wrapper whose original could not be recovered) is reduced to its last line, the
    error itself, without the ``module.Class:`` prefix."""
    text = _ANSI.sub("", str(err)).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else type(err).__name__
    if "Traceback" in text or any(line.startswith("File ") for line in lines):
        last = lines[-1]
        return re.sub(r"^[A-Za-z_][\w.]*(Error|Exception)[\w]*: ", "", last)
    return " ".join(lines)
