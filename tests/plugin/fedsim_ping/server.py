"""The ping family's server: a ping exchange, then FedAvg's round."""

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedsim.core.messages import ARRAYS
from fedsim.protocol.rounds import exchange, standard_round
from fedsim.protocol.setup import ServerSetup


def number(node_index: int, server_round: int) -> float:
    """The number the node at ``node_index`` (partition order) gets."""
    return float(100 * server_round + node_index)


class PingFedAvg(FedAvg):
    """FedAvg with a ``train.ping`` exchange before each round's training."""

    def __init__(self, factor: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.factor = factor
        self.pinged: dict[int, int] = {}

    def run_round(
        self,
        server_round: int,
        arrays: ArrayRecord | None,
        grid: Grid,
        *,
        timeout: float,
        hooks: Any,
    ) -> ArrayRecord | None:
        nodes = list(grid.get_node_ids())
        sent = {node: number(i, server_round) for i, node in enumerate(nodes)}
        contents = {
            node: RecordDict({ARRAYS: ArrayRecord({"n": Array(np.array([x]))})})
            for node, x in sent.items()
        }
        replies = exchange(
            grid, contents, server_round=server_round, action="ping", timeout=timeout
        )
        for node, reply in replies.items():
            got = float(reply.content[ARRAYS]["n"].numpy()[0])
            if got != self.factor * sent[node]:
                raise RuntimeError(f"node {node}: sent {sent[node]}, got {got}")
        self.pinged[server_round] = len(replies)
        return standard_round(hooks, server_round, arrays, grid, timeout=timeout)


def build(setup: ServerSetup) -> PingFedAvg:
    return PingFedAvg(setup.options.factor, **setup.fedavg_options())
