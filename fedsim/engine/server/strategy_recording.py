"""Strategy recording: the metrics a strategy computes itself (those no client
sent, e.g. ``aggregation-error``) become rows of the run, and its client
sampling depends on the seed alone.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsim.core.seeding import derive_seed
from fedsim.engine.server.run_recorder import RunRecorder
from fedsim.protocol.wrapping import DelegatingStrategy


def _discover_first(grid: Grid) -> None:
    """Find the grid's partitions (a query to every node in a deployment)
    before the sampler is reseeded: discovery must not run after the reseed."""
    partitions = getattr(grid, "partitions", None)
    if callable(partitions):
        partitions()


def _client_keys(replies: list[Message]) -> set[str]:
    return {
        key
        for reply in replies
        if not reply.has_error()
        for record in reply.content.metric_records.values()
        for key in record
    }


class RecordingStrategy(DelegatingStrategy):
    """Delegates to ``strategy``; records the metrics it adds when aggregating.

    Flower's samplers draw from the global ``random`` module, which Flower's own
    threads (heartbeats, retries) also draw from at moments that depend on timing.
    So the module is reseeded from ``(seed, phase, round)`` right before each
    ``configure_*`` call: the clients sampled in a round depend on the seed alone.
    """

    def __init__(self, strategy: Strategy, recorder: RunRecorder, *, seed: int):
        super().__init__(strategy)
        self.recorder = recorder
        self.seed = seed

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        _discover_first(grid)
        random.seed(derive_seed(self.seed, "sample-train", server_round))
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        _discover_first(grid)
        random.seed(derive_seed(self.seed, "sample-evaluate", server_round))
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def _record(
        self, server_round: int, phase: str, replies: list[Message], metrics: Any
    ) -> None:
        if metrics is None:
            return
        sent = _client_keys(replies)
        own = {
            k: float(v)
            for k, v in metrics.items()
            if k not in sent and isinstance(v, (int, float))
        }
        if own:
            self.recorder.strategy(server_round, phase, own)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        self._record(server_round, MessageType.TRAIN, replies, metrics)
        return arrays, metrics

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        replies = list(replies)
        metrics = self.strategy.aggregate_evaluate(server_round, replies)
        self._record(server_round, MessageType.EVALUATE, replies, metrics)
        return metrics
