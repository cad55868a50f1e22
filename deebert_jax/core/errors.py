"""The project's errors: one base class for everything a user is told about in one line.

The command-line entry points (`train/cli.py`) print a `DeeBertError` (or an `OSError` naming a
file) as `error: ...` and exit 1; anything else is a bug and keeps its traceback. The subclasses
stay `ValueError`s (or `RuntimeError`s) so that code catching those keeps working.
"""

from __future__ import annotations


class DeeBertError(Exception):
    """Base of every user-facing error: bad input, config, data, checkpoint, or a failed run."""


class InputError(DeeBertError, ValueError):
    """A value the caller gave is out of range or of the wrong kind; the message names it."""


class NonFiniteLossError(DeeBertError, RuntimeError):
    """Training produced a NaN or infinite loss, gradient or parameter; the run stops."""
