"""U-shaped split learning with a spy on the server: every reply a client sends
(all arrays of every exchange) is written to ``split.spy-dir``, named by round,
partition and a counter. Messages are untouched: the run is a real U-shaped run.
"""

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from fedsim.core.messages import METRICS, PARTITION_ID
from fedsim.core.schema import option
from fedsim.protocol.setup import ServerSetup
from strategies.split import USHAPE, UshapeOptions
from strategies.split.server import UshapeStrategy


@dataclass(frozen=True)
class SpyOptions(UshapeOptions):
    spy_dir: str = option("", "where the spy writes what it sees")


class SpyGrid:
    """Delegates to ``grid``; writes each reply's arrays to ``out``."""

    def __init__(self, grid: Grid, out: Path, server_round: int):
        self.grid, self.out, self.server_round = grid, out, server_round
        self.count = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def send_and_receive(self, messages: Any, *, timeout: Any = None) -> Any:
        replies = self.grid.send_and_receive(messages, timeout=timeout)
        for reply in replies:
            if reply.has_error():
                continue
            arrays = {
                f"{record}|{key}": array.numpy()
                for record, rec in reply.content.array_records.items()
                for key, array in rec.items()
            }
            pid = int(reply.content[METRICS][PARTITION_ID])
            self.count += 1
            name = f"up-r{self.server_round}-p{pid}-{self.count:04d}.npz"
            np.savez(self.out / name, **arrays)
        return replies


class SpyUshape(UshapeStrategy):
    def run_round(
        self,
        server_round: int,
        arrays: ArrayRecord | None,
        grid: Grid,
        *,
        timeout: float,
        hooks: Any,
    ) -> ArrayRecord | None:
        spy = SpyGrid(
            grid, Path(self.experiment.strategy.options.spy_dir), server_round
        )
        return super().run_round(
            server_round, arrays, spy, timeout=timeout, hooks=hooks
        )  # type: ignore[arg-type]


def build(setup: ServerSetup) -> SpyUshape:
    return SpyUshape(setup, **setup.fedavg_options())


FAMILY = replace(
    USHAPE,
    name="split-ushape-spy",
    summary="test plug-in: U-shaped split learning, every upload on disk",
    server="fedsim_spy.split:build",
    options=SpyOptions,
)
