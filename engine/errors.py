"""Errors that are part of Winnow's interface.

Every problem a user can cause (unknown name, bad fraction, malformed file, ids that do not
match) is raised as a :class:`WinnowError` subclass with a message that names what is wrong.
The job CLIs catch exactly these, print the message and exit with status 2; anything else is
a bug and keeps its traceback.
"""
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


class RunFailedError(WinnowError, RuntimeError):
    """A distributed run failed for a reason outside the user's input (a worker died more
    often than the configured restarts allow). Jobs exit with status 1 and say how to resume."""

    exit_code = 1


class ResourcesUnavailableError(WinnowError, RuntimeError):
    """A cluster did not provide the nodes a job needs within the configured wait. Exit 1."""

    exit_code = 1


def user_error(exc: BaseException) -> Optional[WinnowError]:
    """The WinnowError behind ``exc`` (unwrapping Ray's task/actor error wrappers), if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, WinnowError):
            # Ray re-raises a task's error as a class deriving from both RayTaskError and the
            # error's own class, whose message is the remote traceback: prefer the original
            cause = getattr(exc, "cause", None)
            return cause if isinstance(cause, WinnowError) and cause is not exc else exc
        for inner in (getattr(exc, "worker_failures", None) or {}).values():  # Ray Train's WorkerGroupError
            err = user_error(inner)
            if err is not None:
                return err
        exc = getattr(exc, "cause", None) or exc.__cause__
    return None
