"""Helpers shared by the command-line entry points."""
from __future__ import annotations

import functools
import logging
import sys

from regkit.errors import RegkitError

log = logging.getLogger("regkit")


def log_to_files(level: int, message: str) -> None:
    """Write ``message`` to the log files only (e.g. a run's train.log): the console already got it
    once, and the console handler would print it a second time."""
    record = log.makeRecord(log.name, level, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers + log.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def exit_on_user_error(fn):
    """Report :class:`~regkit.errors.RegkitError` (bad input) as one line and exit with status 2,
    instead of a traceback; other exceptions (bugs) keep their traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            # Hydra wraps what a constructor raises while instantiating a config node.
            cause = exc.__cause__ if type(exc).__name__ == "InstantiationException" else exc
            if not isinstance(cause, RegkitError):
                raise
            message = f"regkit: error: {cause}"
            print(message, file=sys.stderr)
            log_to_files(logging.ERROR, message)
            sys.exit(2)

    return wrapper
