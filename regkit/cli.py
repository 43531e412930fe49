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
        except RegkitError as exc:
            log.error("error: %s", exc)
            print(f"regkit: error: {exc}", file=sys.stderr)
            sys.exit(2)

    return wrapper
