"""The two errors the runtime reports to its callers, each a line a user can act on."""

from __future__ import annotations


class UsageError(ValueError):
    """Bad user input (a parameter, a file); the message is one line that says what to do."""


class StageError(RuntimeError):
    """A stage produced NaN/inf or failed; the message names the stage."""
