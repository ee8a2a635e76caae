"""HyperFL with a spy on both sides, installed only for the tests (its
``.dist-info`` beside it registers ``hyperfl-spy``).

The server side is HyperFL's strategy running its round through a grid that
writes every reply a client sends (all arrays of every exchange) to
``strategy.spy-dir``; the client side is HyperFL's client, which after each
``train`` also writes its private embedding, head and generated weights there.
Messages are untouched: the run is a real HyperFL run.
"""

from dataclasses import dataclass, replace

from fedsim.core.schema import option
from fedsim.strategies.hyperfl import FAMILY as HYPERFL
from fedsim.strategies.hyperfl import Options


@dataclass(frozen=True)
class SpyOptions(Options):
    spy_dir: str = option("", "where the spy writes what it sees")


FAMILY = replace(
    HYPERFL,
    name="hyperfl-spy",
    summary="test plug-in: HyperFL, every upload and private state on disk",
    server="fedsim_spy.server:build",
    client="fedsim_spy.client:SpyClient",
    options=SpyOptions,
)
