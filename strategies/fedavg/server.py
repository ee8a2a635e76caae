"""FedAvg's server: Flower's message-API ``FedAvg`` (see
:mod:`fedsim.strategies.fedavg`). Where the clients send float16 arrays (a
float16 model), the weighted mean is accumulated in float64
(:func:`fedsim.strategies.fedavg.maths.weighted_mean`), since Flower's sums
the arrays in their own dtype; float32 arrays keep Flower's aggregate as is
(the float32 runs' numbers do not move)."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from fedsim.core.messages import ARRAYS, METRICS
from fedsim.flwr_private import valid_replies
from fedsim.protocol.setup import ServerSetup
from fedsim.strategies.fedavg.maths import weighted_mean


class FedAvg(FlowerFedAvg):
    """Flower's ``FedAvg``, with :func:`weighted_mean` as the aggregate of
    float16 arrays."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if not any(
            getattr(a, "dtype", None) == "float16"
            for msg in replies
            if msg.has_content() and ARRAYS in msg.content
            for a in msg.content[ARRAYS].values()  # type: ignore[union-attr]
        ):
            return super().aggregate_train(server_round, replies)
        valid = valid_replies(self, replies)
        if not valid:
            return None, None
        contents = [msg.content for msg in valid]
        weights = [float(c[METRICS][self.weighted_by_key]) for c in contents]  # type: ignore[index, arg-type]
        arrays = weighted_mean(
            [{k: a.numpy() for k, a in c[ARRAYS].items()} for c in contents],  # type: ignore[union-attr]
            weights,
        )
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        return ArrayRecord({k: Array(v) for k, v in arrays.items()}), metrics


def build(setup: ServerSetup) -> FlowerFedAvg:
    """FedAvg, sampling from all ``federation.clients``. Under DP-FedAvg,
    Flower's own: the DP wrappers compute the mean themselves
    (:class:`fedsim.privacy.dp_fedavg_wrappers.FixedDenominatorMean`) and accept
    only FedAvg's own ``aggregate_train``."""
    if setup.experiment.privacy.mechanism == "dp-fedavg":
        return FlowerFedAvg(**setup.fedavg_options())
    return FedAvg(**setup.fedavg_options())
