"""FedPer's server: Flower's ``FedAvg`` over the body only (see
:mod:`fedsim.strategies.fedper`)."""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedsim.learn.hypernet import is_head
from fedsim.protocol.rounds import standard_round
from fedsim.protocol.setup import ServerSetup, with_message_keys


class FedPer(FedAvg):
    """Example-weighted average of the clients' bodies; no global model.

    Parameters
    ----------
    body : ArrayRecord
        The body round 1 starts from (the initial model without its head).
    **kwargs
        Flower ``FedAvg`` options.
    """

    def __init__(self, body: ArrayRecord, **kwargs: Any):
        super().__init__(**with_message_keys(kwargs))
        #: The current shared body.
        self.body = body

    def run_round(
        self,
        server_round: int,
        arrays: ArrayRecord | None,
        grid: Grid,
        *,
        timeout: float,
        hooks: Any,
    ) -> ArrayRecord | None:
        """FedAvg's round over the body (through ``hooks``); no global model."""
        new = standard_round(hooks, server_round, self.body, grid, timeout=timeout)
        if new is not None:
            self.body = new
        return None

    # -- resume (see fedsim.engine.checkpoint) ---------------------------------
    def checkpoint_state(self) -> dict[str, Any]:
        """The current body."""
        return {"body": {k: a.numpy() for k, a in self.body.items()}}

    def restore_state(self, state: dict[str, Any]) -> None:
        """Continue from a checkpointed body."""
        self.body = ArrayRecord(
            {k: Array(np.ascontiguousarray(v)) for k, v in state["body"].items()}
        )


def build(setup: ServerSetup) -> FedPer:
    """FedPer over the engine's initial model without its head."""
    body = {k: a for k, a in setup.initial.items() if not is_head(k)}
    return FedPer(ArrayRecord(array_dict=body), **setup.fedavg_options())
