"""The one exception type for problems the user can fix."""

from __future__ import annotations


class MoequantError(Exception):
    """A problem with the user's input or environment.

    The message is one line that says what is wrong and what to do about it; the CLI prints it
    without a traceback and exits with status 1.
    """
