"""User-facing errors.

Every mistake a user can make (a bad file, a bad flag, a mismatching checkpoint) raises
:class:`GrowlmError`; the CLI prints its message on one line and exits with code 2, without a
traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class GrowlmError(Exception):
    """A problem with the user's input, stated in one line that says what and where."""


def one_line(message: str) -> str:
    """Collapse a message onto a single line (error messages must never wrap into a traceback-like blob)."""
    return " ".join(str(message).split())
