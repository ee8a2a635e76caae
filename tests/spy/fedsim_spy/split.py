"""U-shaped split learning with a spy on the server: every reply a client sends
(all arrays of every exchange) is written to ``split.spy-dir``, named by round,
partition and a counter. Messages are untouched: the run is a real U-shaped run.
"""

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Message
from flwr.serverapp import Grid

from fedsim.core.messages import METRICS, PARTITION_ID
from fedsim.core.schema import option
from fedsim.protocol.setup import ServerSetup
from fedsim_spy.server import SpyGrid
from strategies.split import USHAPE, UshapeOptions
from strategies.split.server import UshapeStrategy


@dataclass(frozen=True)
class SpyOptions(UshapeOptions):
    spy_dir: str = option("", "where the spy writes what it sees")


class PartitionSpyGrid(SpyGrid):
    """The spy grid naming files by round, partition and a counter; error
    replies are not written."""

    def name(self, reply: Message) -> str | None:
        if reply.has_error():
            return None
        pid = int(reply.content[METRICS][PARTITION_ID])
        self.count += 1
        return f"up-r{self.server_round}-p{pid}-{self.count:04d}.npz"


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
        spy = PartitionSpyGrid(
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
