"""The server side of DP-SGD: declined replies stay out of the aggregate, epsilon
statistics are recorded, and the run stops cleanly once every budget is spent."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import Strategy

from fedsim.core.errors import RunStopped
from fedsim.core.messages import METRICS, PARTITION_ID
from fedsim.privacy.base import (
    CLIENTS_DECLINED,
    DECLINED,
    EPSILON,
    EPSILON_MAX,
    EPSILON_MEAN,
)
from fedsim.protocol.wrapping import DelegatingStrategy


def _metrics(reply: Message) -> MetricRecord:
    return reply.content[METRICS]  # type: ignore[return-value]


class PrivacyBudgetStrategy(DelegatingStrategy):
    """Server side of DP-SGD: keeps declined replies out of aggregation.

    Adds ``epsilon-max``, ``epsilon-mean`` (over the clients that replied) and
    ``clients-declined`` to the aggregated train metrics. Once every client of
    the federation has declined (a spent budget never comes back) the run stops
    cleanly with :class:`fedsim.engine.server.run_recorder.RunStopped`.
    """

    def __init__(self, strategy: Strategy, *, num_clients: int, target_epsilon: float):
        self.strategy = strategy
        self.num_clients = num_clients
        self.target_epsilon = target_epsilon
        self.declined: set[int] = set()

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the replies of clients that trained; add epsilon statistics."""
        replies = list(replies)
        answered = [r for r in replies if not r.has_error()]
        declined = [r for r in answered if _metrics(r).get(DECLINED, 0.0) == 1]
        for reply in declined:
            self.declined.add(int(_metrics(reply)[PARTITION_ID]))  # type: ignore[arg-type]
        trained = [r for r in replies if r not in declined]
        epsilons = [
            float(_metrics(r)[EPSILON])  # type: ignore[arg-type]
            for r in answered
            if EPSILON in _metrics(r)
        ]
        if any(not r.has_error() for r in trained):
            arrays, metrics = self.strategy.aggregate_train(server_round, trained)
        elif declined and len(self.declined) >= self.num_clients:
            raise RunStopped(
                f"privacy budget spent: in round {server_round} every client "
                f"declined to train, as one more round would exceed "
                f"privacy.target-epsilon = {self.target_epsilon:g} "
                f"(epsilon spent: max {max(epsilons):.4g})"
            )
        else:
            arrays, metrics = None, None
        out = MetricRecord(dict(metrics) if metrics is not None else {})
        if epsilons:
            out[EPSILON_MAX] = max(epsilons)
            out[EPSILON_MEAN] = sum(epsilons) / len(epsilons)
        out[CLIENTS_DECLINED] = len(declined)
        return arrays, out

    def checkpoint_state(self) -> dict[str, Any]:
        """The clients that have declined so far (resume)."""
        return {"declined": sorted(self.declined)}

    def restore_state(self, state: dict[str, Any]) -> None:
        """Continue with the checkpointed declined clients."""
        self.declined = {int(pid) for pid in state["declined"]}
