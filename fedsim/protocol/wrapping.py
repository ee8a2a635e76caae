"""A strategy that forwards every hook, and the round, to the strategy it wraps.

Wrappers (recording, privacy budgets, uniform weights, DP accounting) subclass it
and override only the hook that differs, as Flower's own DP wrappers do. The
round itself is forwarded with the outermost wrapper as ``hooks``
(:mod:`fedsim.protocol.rounds`): the family's own round shape always runs, and
every wrapper's hooks apply inside it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsim.protocol.rounds import standard_round


class DelegatingStrategy(Strategy):
    """Forwards ``configure_*``, ``aggregate_*``, ``summary`` and ``run_round`` to
    ``strategy``."""

    def __init__(self, strategy: Any):
        self.strategy = strategy

    def summary(self) -> None:
        self.strategy.summary()

    def run_round(
        self,
        server_round: int,
        arrays: ArrayRecord | None,
        grid: Grid,
        *,
        timeout: float,
        hooks: Strategy,
    ) -> ArrayRecord | None:
        """The wrapped family's round, calling ``hooks`` (the outermost wrapper)."""
        shaped = getattr(self.strategy, "run_round", None)
        if shaped is not None:
            return shaped(server_round, arrays, grid, timeout=timeout, hooks=hooks)  # type: ignore[no-any-return]
        return standard_round(hooks, server_round, arrays, grid, timeout=timeout)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_train(server_round, arrays, config, grid)  # type: ignore[no-any-return]

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)  # type: ignore[no-any-return]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round, replies)  # type: ignore[no-any-return]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)  # type: ignore[no-any-return]
