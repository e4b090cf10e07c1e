"""Errors a user can act on. The CLI prints their message (no traceback) and exits 2, or,
for a run that failed on its way (:class:`RunFailed`), exits 1 with the run recorded as
crashed."""


class YotoError(Exception):
    """A problem with the user's input or environment, explained in the message."""


class ConfigError(YotoError):
    """The configuration names an unknown field or holds a value that is not allowed."""


class DataError(YotoError):
    """A data path is missing, unreadable, empty or in a format yoto cannot read."""


class RunDirError(YotoError):
    """A path is not a run directory, or the run directory is damaged."""


class RunFailed(Exception):
    """A run stopped by something outside its input, explained in one message; the run
    directory says 'crashed' (not a :class:`YotoError`: a resume that meets it was not
    refused, it ran and failed)."""


class DiskFull(RunFailed):
    """No space left on the device that holds the run directory."""
