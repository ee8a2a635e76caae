"""FedPer's server: Flower's ``FedAvg`` over the body only (see
:mod:`fedsim.strategies.fedper`)."""

from __future__ import annotations

from typing import Any

from flwr.app import ArrayRecord
from flwr.serverapp.strategy import FedAvg

from fedsim.learn.hypernet import is_head
from fedsim.protocol.rounds import SharedPart
from fedsim.protocol.setup import ServerSetup, with_message_keys


class FedPer(SharedPart, FedAvg):
    """Example-weighted average of the clients' bodies (``shared``); no global
    model.

    Parameters
    ----------
    body : ArrayRecord
        The body round 1 starts from (the initial model without its head).
    **kwargs
        Flower ``FedAvg`` options.
    """

    def __init__(self, body: ArrayRecord, **kwargs: Any):
        super().__init__(**with_message_keys(kwargs))
        self.shared = body


def build(setup: ServerSetup) -> FedPer:
    """FedPer over the engine's initial model without its head."""
    body = {k: a for k, a in setup.initial.items() if not is_head(k)}
    return FedPer(ArrayRecord(array_dict=body), **setup.fedavg_options())
