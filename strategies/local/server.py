"""The local-only baseline's server: samples, sends empty instructions and
averages the clients' metrics (see :mod:`fedsim.strategies.local`)."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg

from fedsim.flwr_private import valid_replies
from fedsim.protocol.rounds import WithoutGlobalModel
from fedsim.protocol.setup import ServerSetup


class LocalOnly(WithoutGlobalModel, FedAvg):
    """FedAvg's round shape with nothing to aggregate: one train and one evaluate
    exchange with empty arrays."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The clients' weighted training metrics; no arrays."""
        valid = valid_replies(self, replies, validate=False)
        if not valid:
            return None, None
        contents = [msg.content for msg in valid]
        return None, self.train_metrics_aggr_fn(contents, self.weighted_by_key)


def build(setup: ServerSetup) -> LocalOnly:
    """The local-only round driver, sampling as ``[federation]`` says."""
    return LocalOnly(**setup.fedavg_options())
