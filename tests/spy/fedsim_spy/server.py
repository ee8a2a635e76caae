"""The spy's server: HyperFL's round through a grid that records every reply."""

from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.serverapp import Grid

from fedsim.protocol.setup import ServerSetup
from fedsim.strategies.hyperfl.server import HyperFL
from fedsim.strategies.hyperfl.server import build as build_hyperfl


class SpyGrid:
    """Delegates to ``grid``; writes each reply's arrays to ``out``, in the file
    :meth:`name` gives (none: not written)."""

    def __init__(self, grid: Grid, out: Path, server_round: int):
        self.grid, self.out, self.server_round = grid, out, server_round
        self.count = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def name(self, reply: Message) -> str | None:
        """By message type, round, source node and a counter."""
        meta = reply.metadata
        self.count += 1
        return (
            f"up-{meta.message_type}-r{self.server_round}-{meta.src_node_id}-"
            f"{self.count}.npz"
        )

    def send_and_receive(self, messages: Any, *, timeout: Any = None) -> Any:
        replies = self.grid.send_and_receive(messages, timeout=timeout)
        for reply in replies:
            name = self.name(reply)
            if name is None:
                continue
            arrays = {
                f"{record}|{key}": array.numpy()
                for record, rec in reply.content.array_records.items()
                for key, array in rec.items()
            }
            np.savez(self.out / name, **arrays)
        return replies


class Spying:
    """Mixin (before the strategy in the bases): the strategy's own round, run
    through a :attr:`spy_grid` writing to :attr:`spy_dir`."""

    spy_grid: type[SpyGrid] = SpyGrid
    spy_dir = ""

    def run_round(
        self,
        server_round: int,
        arrays: ArrayRecord | None,
        grid: Grid,
        *,
        timeout: float,
        hooks: Any,
    ) -> ArrayRecord | None:
        spy = self.spy_grid(grid, Path(self.spy_dir), server_round)
        return super().run_round(  # type: ignore[misc,no-any-return]
            server_round, arrays, spy, timeout=timeout, hooks=hooks
        )


class SpyHyperFL(Spying, HyperFL):
    pass


def build(setup: ServerSetup) -> SpyHyperFL:
    strategy = build_hyperfl(setup)
    spy = SpyHyperFL(
        strategy.shared,
        fraction_train=strategy.fraction_train,
        fraction_evaluate=strategy.fraction_evaluate,
        min_available_nodes=strategy.min_available_nodes,
    )
    spy.spy_dir = setup.options.spy_dir
    np.savez(
        Path(spy.spy_dir) / "initial.npz",
        **{k: a.numpy() for k, a in strategy.shared.items()},
    )
    return spy
