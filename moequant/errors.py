"""The one exception type for problems the user can fix, and how a cause is quoted in its message."""

from __future__ import annotations


class MoequantError(Exception):
    """A problem with the user's input or environment.

    The message is one line that says what is wrong and what to do about it; the CLI prints it
    without a traceback and exits with status 1.
    """


def first_line(exc: BaseException) -> str:
    """The first non-empty line of ``exc``'s message, or its type's name: a cause quoted in one line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
