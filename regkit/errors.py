"""Errors raised for bad user input.

They subclass the built-in types callers already catch (``ValueError``, ``FileNotFoundError``)
and share :class:`RegkitError` so that the command-line entry points can print them as one
clear line instead of a traceback.
"""


class RegkitError(Exception):
    """Base of all input errors regkit reports to the user."""


class InputError(RegkitError, ValueError):
    """A value, shape, option or file content is not what regkit expects."""


class MissingFileError(RegkitError, FileNotFoundError):
    """A file or folder that the configuration names does not exist."""
