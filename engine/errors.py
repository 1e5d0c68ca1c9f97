"""Errors that are part of Winnow's interface.

Every problem a user can cause (unknown name, bad fraction, malformed file, ids that do not
match) is raised as a :class:`WinnowError` subclass with a message that names what is wrong.
The job CLIs catch exactly these, print the message and exit with status 2; anything else is
a bug and keeps its traceback.
"""


class WinnowError(Exception):
    """Base class of every user-facing error."""


class ConfigError(WinnowError, ValueError):
    """A flag, config field or name is invalid."""


class DataError(WinnowError, ValueError):
    """Input data (images, labels, ids, score tables, manifests) is malformed."""
