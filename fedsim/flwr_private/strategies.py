"""Flower's private helpers of its message-API strategies, as fedsim's
families and privacy wrappers use them."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Message

STRATEGY = "flwr.serverapp.strategy.FedAvg"
#: Flower's functions this module calls, and their parameters.
PATCHED = {
    f"{STRATEGY}._check_and_log_replies": ("self", "replies", "is_train", "validate"),
    "flwr.supercore.differential_privacy.get_norm": ("input_arrays",),
    "flwr.supercore.log": ("level", "msg", "args", "kwargs"),
}


def valid_replies(
    strategy: Any, replies: Iterable[Message], *, validate: bool = True
) -> list[Message]:
    """The training replies Flower's ``strategy`` (a ``FedAvg`` or subclass)
    would aggregate: those without an error and, with ``validate``, with the
    records it expects; the others are logged as Flower logs them."""
    valid, _ = strategy._check_and_log_replies(
        list(replies), is_train=True, validate=validate
    )
    return list(valid)


def norm(arrays: list[np.ndarray]) -> float:
    """The L2 norm of ``arrays`` taken together, as Flower's DP wrappers take it."""
    from flwr.supercore.differential_privacy import get_norm

    return float(get_norm(arrays))


def log(level: int, msg: str, *args: Any) -> None:
    """A line in Flower's log (the run's ``flower.log``)."""
    from flwr.supercore import log as flower_log

    flower_log(level, msg, *args)
