"""Errors a user can act on. The CLI prints their message (no traceback) and exits 2."""


class YotoError(Exception):
    """A problem with the user's input or environment, explained in the message."""


class ConfigError(YotoError):
    """The configuration names an unknown field or holds a value that is not allowed."""


class DataError(YotoError):
    """A data path is missing, unreadable, empty or in a format yoto cannot read."""


class RunDirError(YotoError):
    """A path is not a run directory, or the run directory is damaged."""
