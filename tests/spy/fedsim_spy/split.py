"""U-shaped split learning with a spy on the server: every reply a client sends
(all arrays of every exchange) is written to ``split.spy-dir``, named by round,
partition and a counter. Messages are untouched: the run is a real U-shaped run.
"""

from dataclasses import dataclass, replace

from flwr.app import Message

from fedsim.core.messages import METRICS, PARTITION_ID
from fedsim.core.schema import option
from fedsim.protocol.setup import ServerSetup
from fedsim.strategies.split import USHAPE, UshapeOptions
from fedsim.strategies.split.server import UshapeStrategy
from fedsim_spy.server import SpyGrid, Spying


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


class SpyUshape(Spying, UshapeStrategy):
    spy_grid = PartitionSpyGrid

    @property  # type: ignore[override]
    def spy_dir(self) -> str:
        return str(self.experiment.strategy.options.spy_dir)


def build(setup: ServerSetup) -> SpyUshape:
    return SpyUshape(setup, **setup.fedavg_options())


FAMILY = replace(
    USHAPE,
    name="split-ushape-spy",
    summary="test plug-in: U-shaped split learning, every upload on disk",
    server="fedsim_spy.split:build",
    options=SpyOptions,
)
