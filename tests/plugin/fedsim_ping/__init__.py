"""A plug-in strategy family, installed only for the tests (its ``.dist-info``
beside it registers it in the ``fedsim.strategies`` entry-point group).

Each round has two exchanges: ``train.ping`` sends every sampled node its own
number (an array) and gets it back doubled, then FedAvg's ordinary train and
evaluate. The server checks every doubled number, so a ping that did not reach
the right client's ``ping`` method fails the run.
"""

from dataclasses import dataclass

from fedsim.core.family import Family
from fedsim.core.schema import at_least, option


@dataclass(frozen=True)
class PingOptions:
    """``strategy.factor``: what the client multiplies the number by."""

    factor: int = option(
        2, "ping: the client multiplies the number by this", at_least(1)
    )


FAMILY = Family(
    name="ping",
    summary="test plug-in: ping every node with its own number, then FedAvg",
    server="fedsim_ping.server:build",
    client="fedsim_ping.client:PingClient",
    options=PingOptions,
    privacy=("none", "dp-sgd"),
    actions=("ping",),
)
