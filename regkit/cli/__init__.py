"""Helpers shared by the command-line entry points."""
from __future__ import annotations

import functools
import logging
import sys

from regkit.errors import RegkitError

log = logging.getLogger("regkit")


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
            log.error("error: %s", cause)
            print(f"regkit: error: {cause}", file=sys.stderr)
            sys.exit(2)

    return wrapper
