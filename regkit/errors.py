"""Errors raised for bad user input, and the one helper that checks a choice.

They subclass the built-in types callers already catch (``ValueError``, ``FileNotFoundError``)
and share :class:`RegkitError` so that the command-line entry points can print them as one
clear line instead of a traceback.
"""
from __future__ import annotations

import difflib
from typing import Any, Iterable, TypeVar

T = TypeVar("T")


class RegkitError(Exception):
    """Base of all input errors regkit reports to the user."""


class InputError(RegkitError, ValueError):
    """A value, shape, option or file content is not what regkit expects."""


class MissingFileError(RegkitError, FileNotFoundError):
    """A file or folder that the configuration names does not exist."""


class TrainingError(RegkitError, FloatingPointError):
    """A run cannot go on, e.g. its loss became non-finite (reported as one line, like bad input)."""


def unknown_choice_message(what: str, value: Any, valid: Iterable[Any]) -> str:
    """``Unknown <what> '<value>'. Did you mean '<closest>'? Valid: a, b, c.`` (one line)."""
    names = [str(v) for v in valid]
    close = difflib.get_close_matches(str(value), names, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"Unknown {what} '{value}'.{hint} Valid: {', '.join(names)}."


def check_choice(what: str, value: T, valid: Iterable[Any]) -> T:
    """Return ``value`` if it is one of ``valid``, else raise :class:`InputError` naming the
    value, the closest valid one and all valid ones. ``what`` names the option as a user would
    write it, e.g. ``"trainer.precision"`` or ``"label_mode"``."""
    valid = list(valid)
    if value not in valid:
        raise InputError(unknown_choice_message(what, value, valid))
    return value
