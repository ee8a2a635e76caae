"""FedProphet's server: stage coordination, APA, DMA and masked averaging (see
:mod:`fedsim.strategies.fedprophet`)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedsim.core.capacity import capacity_of
from fedsim.core.messages import ARRAYS, CONFIG, METRICS, NUM_EXAMPLES
from fedsim.flwr_private import valid_replies
from fedsim.learn.cascade import (
    BOUNDED,
    EPSILON,
    PERTURBATION,
    PROPHETS,
    STAGE,
    Partition,
    aux_key,
    cascade_for,
)
from fedsim.protocol.rounds import exchange, per_node
from fedsim.protocol.setup import ServerSetup, with_message_keys
from fedsim.strategies.fedprophet.maths import (
    adjust_alpha,
    apa_due,
    feature_epsilon,
    masked_average,
    prophet_modules,
    should_advance,
)


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


class FedProphet(FedAvg):
    """Cascaded, memory-bounded adversarial training coordinated by stages.

    Parameters
    ----------
    arrays : dict of str to ndarray
        The model's initial parameters and every auxiliary head's
        (``aux.<module>.<name>``).
    part : Partition
        The module partition.
    names : list of list of str
        Parameter names of each module.
    options : Options
        The family's keys.
    rounds : int
        The run's rounds (for each stage's share).
    **kwargs
        Flower ``FedAvg`` options.
    """

    def __init__(
        self,
        arrays: dict[str, np.ndarray],
        part: Partition,
        names: list[list[str]],
        options: Any,
        rounds: int,
        **kwargs: Any,
    ):
        super().__init__(**with_message_keys(kwargs))
        self.arrays, self.part, self.names, self.options = arrays, part, names, options
        self.rounds_per_stage = math.ceil(rounds / len(part.modules))
        self.stage, self.stage_start = 0, 1
        self.epsilon, self.bounded = options.epsilon, True
        self.alpha, self.last_ratio = 1.0, 1.0
        #: ``alpha`` at the stage's best score (the measurement's radius).
        self.best_alpha = 1.0
        self.ratios: list[float] = []
        self.best, self.since_best = -math.inf, 0
        #: The clean/robust ratio at the stage's best score so far.
        self.best_ratio = 1.0

    # -- content -----------------------------------------------------------------
    def prophets_of(self, partition_id: int) -> int:
        budget = capacity_of(self.options.memory_mb, partition_id) * 1e6
        return prophet_modules(self.stage, self.part.memory, budget)

    def content(self, upto: int, heads: Iterable[int], config: dict) -> RecordDict:
        """Parameters of modules ``0..upto`` and the given auxiliary heads."""
        keys = [k for m in range(upto + 1) for k in self.names[m]]
        keys += [k for k in self.arrays if any(k.startswith(aux_key(h)) for h in heads)]
        return RecordDict(
            {
                ARRAYS: _record({k: self.arrays[k] for k in keys}),
                CONFIG: ConfigRecord(config),
            }
        )

    def _own(
        self, messages: Iterable[Message], grid: Grid, *, train: bool
    ) -> list[Message]:
        def content(msg: Message, partition_id: int) -> RecordDict:
            prophets = self.prophets_of(partition_id) if train else 0
            last = self.stage + prophets
            config = {
                **dict(msg.content[CONFIG]),  # type: ignore[arg-type]
                STAGE: self.stage,
                PROPHETS: prophets,
                EPSILON: self.epsilon * self.alpha,
                BOUNDED: int(self.bounded),
            }
            return self.content(last, {self.stage, last}, config)

        return per_node(messages, grid, content)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = super().configure_train(server_round, arrays, config, grid)
        return self._own(messages, grid, train=True)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = super().configure_evaluate(server_round, arrays, config, grid)
        return self._own(messages, grid, train=False)

    # -- aggregation -------------------------------------------------------------
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Masked averaging: each array over the clients that trained it."""
        valid = valid_replies(self, replies, validate=False)
        if not valid:
            return None, None
        uploads = [
            (
                {k: v.numpy() for k, v in m.content[ARRAYS].items()},  # type: ignore[union-attr]
                float(m.content[METRICS][NUM_EXAMPLES]),  # type: ignore[arg-type]
            )
            for m in valid
        ]
        self.arrays = masked_average(self.arrays, uploads)
        metrics = self.train_metrics_aggr_fn(
            [m.content for m in valid], self.weighted_by_key
        )
        if metrics is not None:
            metrics["stage"] = float(self.stage)
            metrics["train-epsilon"] = float(self.epsilon * self.alpha)
        return None, metrics

    # -- the round -----------------------------------------------------------------
    def run_round(
        self,
        server_round: int,
        arrays: ArrayRecord | None,
        grid: Grid,
        *,
        timeout: float,
        hooks: Any,
    ) -> ArrayRecord | None:
        """Train, evaluate, then coordinate the stage (APA, advance)."""
        messages = hooks.configure_train(
            server_round, ArrayRecord(), ConfigRecord(), grid
        )
        hooks.aggregate_train(
            server_round, grid.send_and_receive(messages, timeout=timeout)
        )
        messages = hooks.configure_evaluate(
            server_round, ArrayRecord(), ConfigRecord(), grid
        )
        metrics = hooks.aggregate_evaluate(
            server_round, grid.send_and_receive(messages, timeout=timeout)
        )
        self.coordinate(server_round, metrics, grid, timeout=timeout)
        return None

    def coordinate(
        self, server_round: int, metrics: Any, grid: Grid, *, timeout: float
    ) -> None:
        """Track the stage's score (clean + last ratio x robust accuracy), adjust
        the perturbation (APA) and advance the stage when it is done."""
        if metrics is not None and "accuracy" in metrics:
            clean = float(metrics["accuracy"])
            robust = metrics.get("robust-accuracy")
            score = clean
            if robust is not None:
                score += self.last_ratio * float(robust)
                if float(robust) > 0:
                    self.ratios.append(clean / float(robust))
            if score > self.best:
                self.best, self.since_best = score, 0
                self.best_ratio = self.ratios[-1] if self.ratios else self.last_ratio
                self.best_alpha = self.alpha
            else:
                self.since_best += 1
        in_stage = server_round - self.stage_start + 1
        if self.stage > 0 and apa_due(in_stage, self.rounds_per_stage):
            self.alpha = adjust_alpha(
                self.alpha, self.ratios, self.last_ratio, self.options.eps_quantile
            )
        done = should_advance(
            in_stage,
            self.rounds_per_stage,
            self.since_best,
            self.options.patience,
        )
        if done and self.stage < len(self.part.modules) - 1:
            self.advance(server_round, grid, timeout=timeout)

    def advance(self, server_round: int, grid: Grid, *, timeout: float) -> None:
        """Next stage: its inputs' epsilon from the feature perturbations that
        adversarial inputs (at the stage's best ``alpha``, as the reference)
        cause at the output of the finished module."""
        config = {
            STAGE: self.stage,
            PROPHETS: 0,
            EPSILON: self.epsilon * self.best_alpha,
            BOUNDED: int(self.bounded),
        }
        nodes = list(grid.get_node_ids())
        replies = exchange(
            grid,
            {n: self.content(self.stage, {self.stage}, dict(config)) for n in nodes},
            server_round=server_round,
            action=PERTURBATION,
            timeout=timeout,
        )
        ok = [r.content[METRICS] for r in replies.values() if not r.has_error()]
        if ok:
            dim = int(ok[0]["feature-dim"])  # type: ignore[arg-type]
            norms = [float(m["perturbation"]) for m in ok]  # type: ignore[arg-type]
            self.epsilon = feature_epsilon(norms, dim)
            self.bounded = all(float(m["feature-min"]) >= 0 for m in ok)  # type: ignore[arg-type]
        self.alpha = self.best_alpha = self.options.eps_quantile
        self.last_ratio = self.best_ratio
        self.ratios, self.best, self.since_best = [], -math.inf, 0
        self.stage += 1
        self.stage_start = server_round + 1

    # -- resume ------------------------------------------------------------------
    #: Scalar attributes of the stage coordination (with ``arrays``, ``ratios``:
    #: everything later rounds depend on).
    SCALARS = (
        "stage",
        "stage_start",
        "epsilon",
        "bounded",
        "alpha",
        "best_alpha",
        "last_ratio",
        "best",
        "since_best",
        "best_ratio",
    )

    def checkpoint_state(self) -> dict[str, Any]:
        """The model and heads, and the stage coordination (stage, APA, DMA)."""
        state: dict[str, Any] = {k: getattr(self, k) for k in self.SCALARS}
        state["arrays"] = {k: np.array(v) for k, v in self.arrays.items()}
        state["ratios"] = list(self.ratios)
        return state

    def restore_state(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`checkpoint_state`."""
        for key in self.SCALARS:
            setattr(self, key, type(getattr(self, key))(state[key]))
        self.arrays = {k: np.asarray(v) for k, v in state["arrays"].items()}
        self.ratios = [float(r) for r in state["ratios"]]


def build(setup: ServerSetup) -> FedProphet:
    """FedProphet over the experiment's model and memory budgets."""
    exp = setup.experiment
    cascade = cascade_for(exp, setup.model, setup.data.info)
    arrays = {k: v.numpy() for k, v in setup.initial.items()}
    arrays.update(cascade.aux_arrays(exp.seed))
    return FedProphet(
        arrays,
        cascade.part,
        cascade.names,
        setup.options,
        exp.rounds,
        **setup.fedavg_options(),
    )
