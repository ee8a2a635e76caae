"""DP-FedAvg: client-level differential privacy on the server.

McMahan et al., "Learning Differentially Private Recurrent Language Models" (ICLR
2018); adaptive clipping from Andrew et al., "Differentially Private Learning
with Adaptive Clipping" (NeurIPS 2021). Flower's server-side clipping wrappers
around a uniformly weighted FedAvg; :class:`DpFedAvgAccounting` records the
server's ``epsilon`` per round. Rounds are accounted as Poisson-subsampled
Gaussian mechanisms with rate ``clients_per_round / clients``: Flower samples a
fixed number of clients without replacement, so this is the usual approximation,
exact when ``federation.fraction-train = 1`` (README, "Differential privacy").
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)
from torch import nn

from fedsim.core.errors import ConfigError, RunStopped
from fedsim.core.experiment import Experiment, PrivacyConfig
from fedsim.learn.data import FederatedData
from fedsim.privacy import accounting
from fedsim.privacy.base import CLIPPING_NORM, EPSILON, NOISE_MULTIPLIER, NoPrivacy
from fedsim.protocol.wrapping import DelegatingStrategy


def clients_per_round(experiment: Experiment) -> int:
    """How many clients Flower's FedAvg samples each round."""
    fed = experiment.federation
    return max(int(fed.clients * fed.fraction_train), 1)


def dp_fedavg_noise(experiment: Experiment) -> float:
    """The server's noise multiplier: given, or calibrated for all ``rounds``.

    Rounds are composed as Poisson-subsampled Gaussian mechanisms with sample
    rate ``clients_per_round / clients`` (see the module docstring on Flower's
    fixed-size sampling).
    """
    cfg = experiment.privacy
    if cfg.noise_multiplier > 0:
        return cfg.noise_multiplier
    q = clients_per_round(experiment) / experiment.federation.clients
    try:
        return accounting.calibrate_noise(
            cfg.target_epsilon, cfg.target_delta, q, experiment.rounds, cfg.accountant
        )
    except accounting.BudgetTooSmall as err:
        raise ConfigError(f"privacy.target-epsilon: {err}") from None


def count_stddev(cfg: PrivacyConfig, sampled: int) -> float:
    """Noise std of the clipped count (adaptive clipping)."""
    return cfg.clipped_count_stddev or sampled / 20


def check_adaptive_noise(cfg: PrivacyConfig, sigma: float, sampled: int) -> None:
    """Adaptive clipping spends part of the noise on the clipped count."""
    stddev = count_stddev(cfg, sampled)
    if cfg.clipping == "adaptive" and sigma >= stddev:
        raise ConfigError(
            f"privacy.noise-multiplier: {sigma:.4g} must be < clipped-count-stddev "
            f"= {stddev:g} with adaptive clipping ({sampled} clients per round); "
            "raise privacy.clipped-count-stddev or use privacy.clipping = 'fixed'"
        )


class AdaptiveClipping(DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's server-side adaptive clipping with Andrew et al.'s update.

    Flower 1.41 counts the *clipped* updates but applies the paper's rule,
    written for the *unclipped* ones, so its norm runs away from the target
    quantile; and it updates the norm before noising the aggregate, so the
    noise follows the next round's norm instead of the one that clipped. This
    subclass overrides the one hook that computes the update
    (``_geometric_update``, called by Flower's ``aggregate_train``) to hold the
    new norm back, and applies it once the aggregate is noised: the norm moves
    by ``exp(-lr * (unclipped_fraction - target_quantile))``.

    Parameters
    ----------
    update_noise_multiplier : float
        The noise multiplier of the update itself, set by
        :func:`fedsim.privacy.accounting.adaptive_update_noise` so that update
        and count together are accounted at the run's noise multiplier.
    *args, **kwargs
        Flower's ``DifferentialPrivacyServerSideAdaptiveClipping`` arguments.
    """

    def __init__(self, *args: Any, update_noise_multiplier: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.noise_multiplier = update_noise_multiplier
        self._next_norm: float | None = None

    def _geometric_update(self, clipped_fraction: float) -> None:
        unclipped = 1.0 - clipped_fraction
        self._next_norm = self.clipping_norm * math.exp(
            -self.clip_norm_lr * (unclipped - self.target_clipped_quantile)
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        result = super().aggregate_train(server_round, replies)
        if self._next_norm is not None:
            self.clipping_norm, self._next_norm = self._next_norm, None
        return result  # type: ignore[no-any-return]


class UniformWeights(DelegatingStrategy):
    """Makes a weighted FedAvg average its replies uniformly.

    DP-FedAvg's sensitivity bound (one client moves the mean by at most
    ``clipping_norm / clients_per_round``) needs equal weights: this sets each
    reply's weight metric to 1 just before aggregation (the recorder has already
    recorded the true ``num-examples``).
    """

    def __init__(self, strategy: Strategy, weight_key: str):
        self.strategy = strategy
        self.weight_key = weight_key

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        for reply in replies:
            if not reply.has_error():
                for record in reply.content.metric_records.values():
                    record[self.weight_key] = 1
        return self.strategy.aggregate_train(server_round, replies)


class DpFedAvgAccounting(DelegatingStrategy):
    """Accounts the releases of a Flower DP wrapper and records ``epsilon``.

    Every round whose aggregate is released composes one Poisson-subsampled
    Gaussian mechanism (``noise_multiplier``, ``sample_rate``); the cumulative
    epsilon at ``target_delta``, the clipping norm and the noise multiplier are
    added to the aggregated train metrics (server-side rows). With a
    ``target_epsilon``, a round that would exceed it is not started: the run
    stops cleanly.
    """

    def __init__(
        self,
        strategy: Any,
        *,
        noise_multiplier: float,
        sample_rate: float,
        target_delta: float,
        target_epsilon: float = 0.0,
        accountant: str = "rdp",
    ):
        self.strategy = strategy
        self.noise_multiplier = noise_multiplier
        self.sample_rate = sample_rate
        self.target_delta = target_delta
        self.target_epsilon = target_epsilon
        self.accountant = accountant
        self.history: list[accounting.Step] = []

    def epsilon(self, history: Sequence[accounting.Step] | None = None) -> float:
        """Cumulative epsilon of ``history`` (default: the releases so far)."""
        return accounting.epsilon(
            self.history if history is None else history,
            self.target_delta,
            self.accountant,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.target_epsilon > 0:
            step = (self.noise_multiplier, self.sample_rate, 1)
            after = self.epsilon(accounting.merge(self.history, step))
            if after > self.target_epsilon:
                raise RunStopped(
                    f"privacy budget spent: round {server_round} would take the "
                    f"server's epsilon from {self.epsilon():.4g} to {after:.4g}, over "
                    f"privacy.target-epsilon = {self.target_epsilon:g}"
                )
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        norm = float(self.strategy.clipping_norm)  # the norm that clips this round
        arrays, metrics = self.strategy.aggregate_train(server_round, list(replies))
        if arrays is not None:
            step = (self.noise_multiplier, self.sample_rate, 1)
            self.history = accounting.merge(self.history, step)
        out = MetricRecord(dict(metrics) if metrics is not None else {})
        out[EPSILON] = self.epsilon()
        out[NOISE_MULTIPLIER] = self.noise_multiplier
        out[CLIPPING_NORM] = norm
        return arrays, out


class DpFedAvg(NoPrivacy):
    """Client-level DP: plain local training, clipping and noise on the server."""

    @classmethod
    def wrap_strategy(cls, strategy: Strategy, experiment: Experiment) -> Strategy:
        """Flower's server-side DP wrapper around a uniform FedAvg, accounted."""
        if not isinstance(strategy, FedAvg) or (
            type(strategy).aggregate_train is not FedAvg.aggregate_train
        ):
            raise ConfigError(
                f"privacy.mechanism: 'dp-fedavg' needs a strategy that averages "
                f"whole models like FedAvg; strategy {experiment.strategy.name!r} "
                f"built {type(strategy).__name__}"
            )
        cfg = experiment.privacy
        sampled = clients_per_round(experiment)
        sigma = dp_fedavg_noise(experiment)
        uniform = UniformWeights(strategy, strategy.weighted_by_key)
        wrapped: Any
        if cfg.clipping == "adaptive":
            check_adaptive_noise(cfg, sigma, sampled)
            stddev = count_stddev(cfg, sampled)
            wrapped = AdaptiveClipping(
                uniform,
                sigma,
                sampled,
                initial_clipping_norm=cfg.clipping_norm,
                target_clipped_quantile=cfg.target_unclipped_quantile,
                clip_norm_lr=cfg.clip_norm_lr,
                clipped_count_stddev=stddev,
                update_noise_multiplier=accounting.adaptive_update_noise(sigma, stddev),
            )
        else:
            wrapped = DifferentialPrivacyServerSideFixedClipping(
                uniform, sigma, cfg.clipping_norm, sampled
            )
        return DpFedAvgAccounting(
            wrapped,
            noise_multiplier=sigma,
            sample_rate=sampled / experiment.federation.clients,
            target_delta=cfg.target_delta,
            target_epsilon=cfg.target_epsilon,
            accountant=cfg.accountant,
        )

    @classmethod
    def preflight(
        cls, experiment: Experiment, model: nn.Module, data: FederatedData
    ) -> None:
        """The noise must exist (budget reachable) and suit adaptive clipping."""
        sigma = dp_fedavg_noise(experiment)
        check_adaptive_noise(experiment.privacy, sigma, clients_per_round(experiment))
