"""Errors that cross layers: bad input, a round that cannot complete, a clean stop."""

from __future__ import annotations


class ConfigError(ValueError):
    """An invalid experiment; the message is one line naming the key."""


class RoundFailed(RuntimeError):
    """A round could not complete (e.g. too few successful replies)."""


class RunStopped(Exception):
    """The run ends early but cleanly (e.g. every client's privacy budget is
    spent); the message is the reason recorded in ``summary.json``."""
