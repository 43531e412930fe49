"""Helpers shared by the command-line entry points."""
from __future__ import annotations

import functools
import logging
import sys
import time

from regkit.device import env_rank
from regkit.errors import RegkitError

log = logging.getLogger("regkit")
# torchrun stops every process as soon as one exits with an error: a process other than 0 that
# leaves an error for process 0 to print waits this long first, so that process 0 prints it
RANK_ZERO_GRACE_S = 3.0


def exit_quietly_after_rank_zero(status: int = 2) -> None:
    """Exit without a word on a torchrun process other than 0 whose error process 0 reports too."""
    time.sleep(RANK_ZERO_GRACE_S)
    sys.exit(status)


def log_to_files(level: int, message: str) -> None:
    """Write ``message`` to the log files only (e.g. a run's train.log): the console already got it
    once, and the console handler would print it a second time."""
    record = log.makeRecord(log.name, level, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers + log.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def exit_on_user_error(fn):
    """Report :class:`~regkit.errors.RegkitError` (bad input) as one line and exit with status 2,
    instead of a traceback; other exceptions (bugs) keep their traceback. An error that every
    process of a torchrun launch raised alike (``every_process``, see
    :func:`regkit.registration.distributed.everywhere`) is printed by process 0 only."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            # Hydra wraps what a constructor raises while instantiating a config node.
            cause = exc.__cause__ if type(exc).__name__ == "InstantiationException" else exc
            if not isinstance(cause, RegkitError):
                raise
            if getattr(cause, "every_process", False) and env_rank() != 0:
                exit_quietly_after_rank_zero(2)  # process 0 prints the same line
            message = f"regkit: error: {cause}"
            print(message, file=sys.stderr)
            log_to_files(logging.ERROR, message)
            sys.exit(2)

    return wrapper
