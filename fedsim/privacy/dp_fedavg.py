"""DP-FedAvg: client-level differential privacy on the server.

McMahan et al., "Learning Differentially Private Recurrent Language Models" (ICLR
2018); adaptive clipping from Andrew et al., "Differentially Private Learning
with Adaptive Clipping" (NeurIPS 2021). The strategy the ServerApp runs is, from
the outside in: :class:`DpFedAvgAccounting` (records ``epsilon``, enforces the
budget) -> :class:`FixedClipping` or :class:`AdaptiveClipping` (Flower's
server-side wrappers, subclassed) -> :class:`FixedDenominatorMean` ->
(:class:`PoissonSampling` ->) the family's FedAvg. The maths of a release is in
:mod:`fedsim.privacy.dp_fedavg_maths`, the wrappers in
:mod:`fedsim.privacy.dp_fedavg_wrappers`.

Every round releases ``current + (sum of clipped updates + N(0, (z C)^2)) / D``
and is accounted as one Poisson-subsampled Gaussian step with noise multiplier
``z``. Where fedsim departs from Flower 1.41's wrappers, and why:

- **Fixed denominator.** ``D`` is fixed before the round: the ``m`` clients
  sampled, or ``q N`` under Poisson sampling (the paper's fixed-size
  estimator). Flower divides by the replies that came back while its noise
  stays ``z C / m``, so a round with failures or timeouts had less noise than
  accounted. Here a client that fails or times out contributes a zero update:
  the round shrinks towards the current model by ``replies / D``, its noise and
  its accounting do not change.
- **Every round releases.** Flower skips a round with any error reply; fedsim
  leaves error replies out and releases all the same, also when no client
  replied or none was drawn (then the release is the current model plus noise,
  accounted as a step: skipping an empty Poisson round would tell whether a
  client exists).
- **Zero updates.** An update of norm 0 makes Flower's clipping divide by zero;
  it is left out of Flower's clipping (its clipped update is 0 either way) and,
  with adaptive clipping, counted as unclipped.
- **Adaptive clipping.** The count is of *unclipped* updates, over ``D``, as
  in the paper (Flower counts clipped ones over the replies), centred by
  default as in the paper and TF-Privacy (``privacy.count-release``: each
  client adds ``b - 1/2``, sensitivity 1/2; ``uncentred``: ``b``, sensitivity
  1; a client that did not reply adds 0, i.e. counts as half unclipped when
  centred), clamped to ``[0, 1]`` as TF-Privacy does, and the new norm
  applies from the next round: the aggregate is noised with the norm that
  clipped it (Flower 1.41 updated the norm first). The noise is split between
  updates and count with fedsim's formula
  (:func:`fedsim.privacy.accounting.adaptive_update_noise`), and fedsim logs its
  own figure of the extra noise on the updates instead of Flower's.
- **Randomness.** Noise is drawn from a generator seeded from the run's seed
  (Flower draws from numpy's global one); like Opacus without ``secure_mode``,
  this suits a simulation, not a deployment.

Sampling (``privacy.client-sampling``): with ``"fixed"``, Flower samples ``m``
clients without replacement and the rounds are accounted as Poisson with
``q = m / N``: an approximation, not a bound (under replace-one adjacency
fixed-size sampling can be far worse: Lebeda et al., 2024; Birrell et al.,
2024); with ``m = N`` there is no sampling and the accounting is exact if the
number of participating clients is public. With ``"poisson"``, every client
joins a round independently with probability ``q = fraction-train`` and the
accounting is that of the mechanism that runs. ``summary.json`` says which
(``accounting``, :func:`accounting_label`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy
from torch import nn

from fedsim.core.errors import ConfigError, RunStopped
from fedsim.core.experiment import (
    Experiment,
    PrivacyConfig,
    expected_clients_per_round,
)
from fedsim.core.seeding import derive_seed
from fedsim.learn.data import FederatedData
from fedsim.privacy import accounting
from fedsim.privacy.base import CLIPPING_NORM, EPSILON, NOISE_MULTIPLIER, NoPrivacy
from fedsim.privacy.dp_fedavg_wrappers import (
    AdaptiveClipping,
    FixedClipping,
    FixedDenominatorMean,
    PoissonSampling,
)
from fedsim.protocol.wrapping import DelegatingStrategy

#: ``accounting`` in ``summary.json``: how the server's epsilon relates to the
#: sampling that ran.
POISSON = "poisson"
POISSON_APPROXIMATION = "poisson-approximation"
FULL_PARTICIPATION = "full-participation"


def sample_rate(experiment: Experiment) -> float:
    """The accountant's client sampling rate ``q``: ``fraction-train`` under
    Poisson sampling, ``m / clients`` under fixed-size sampling."""
    fed = experiment.federation
    if experiment.privacy.client_sampling == "poisson":
        return fed.fraction_train
    return expected_clients_per_round(experiment) / fed.clients


def accounting_label(experiment: Experiment) -> str:
    """What the server's epsilon is: exact for Poisson sampling, exact for
    full participation if the number of clients is public, else the Poisson
    approximation of fixed-size sampling."""
    if experiment.privacy.client_sampling == "poisson":
        return POISSON
    if sample_rate(experiment) >= 1:
        return FULL_PARTICIPATION
    return POISSON_APPROXIMATION


def dp_fedavg_noise(experiment: Experiment) -> float:
    """The server's noise multiplier: given, or calibrated for all ``rounds``
    at :func:`sample_rate`."""
    cfg = experiment.privacy
    if cfg.noise_multiplier > 0:
        return cfg.noise_multiplier
    q = sample_rate(experiment)
    try:
        return accounting.calibrate_noise(
            cfg.target_epsilon, cfg.target_delta, q, experiment.rounds, cfg.accountant
        )
    except accounting.BudgetTooSmall as err:
        raise ConfigError(f"privacy.target-epsilon: {err}") from None


def count_stddev(cfg: PrivacyConfig, expected: float) -> float:
    """Noise std of the unclipped count (adaptive clipping): given, or
    ``expected`` clients per round / 20 (Andrew et al.'s default)."""
    return cfg.clipped_count_stddev or expected / 20


def check_adaptive_noise(cfg: PrivacyConfig, sigma: float, expected: float) -> None:
    """Adaptive clipping spends part of the noise on the clipped count."""
    stddev = count_stddev(cfg, expected)
    scaled = stddev / accounting.COUNT_SENSITIVITY[cfg.count_release]
    if cfg.clipping == "adaptive" and sigma >= scaled:
        centred = " / 1/2 (centred count)" if cfg.count_release == "centred" else ""
        raise ConfigError(
            f"privacy.noise-multiplier: {sigma:.4g} must be < clipped-count-stddev "
            f"= {stddev:g}{centred} with adaptive clipping ({expected:g} clients per "
            "round); raise privacy.clipped-count-stddev or use privacy.clipping = "
            "'fixed'"
        )


class DpFedAvgAccounting(DelegatingStrategy):
    """Accounts the releases of the DP wrapper and records ``epsilon``.

    Every round whose aggregate is released (with the wrappers above, every
    round) composes one Poisson-subsampled Gaussian mechanism
    (``noise_multiplier``, ``sample_rate``); the cumulative epsilon at
    ``target_delta``, the clipping norm and the noise multiplier are added to
    the aggregated train metrics (server-side rows). With a ``target_epsilon``,
    a round that would exceed it is not started: the run stops cleanly.
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
        return self.strategy.configure_train(server_round, arrays, config, grid)  # type: ignore[no-any-return]

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

    def checkpoint_state(self) -> dict[str, Any]:
        """The accountant's history of releases (resume)."""
        return {"history": [list(step) for step in self.history]}

    def restore_state(self, state: dict[str, Any]) -> None:
        """Continue with the checkpointed accountant history."""
        self.history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]


class DpFedAvg(NoPrivacy):
    """Client-level DP: plain local training, clipping and noise on the server."""

    @classmethod
    def wrap_strategy(cls, strategy: Strategy, experiment: Experiment) -> Strategy:
        """The DP chain of the module docstring around the family's FedAvg."""
        if not isinstance(strategy, FedAvg) or (
            type(strategy).aggregate_train is not FedAvg.aggregate_train
        ):
            raise ConfigError(
                f"privacy.mechanism: 'dp-fedavg' needs a strategy that averages "
                f"whole models like FedAvg; strategy {experiment.strategy.name!r} "
                f"built {type(strategy).__name__}"
            )
        cfg = experiment.privacy
        denominator = expected_clients_per_round(experiment)
        sigma = dp_fedavg_noise(experiment)
        rng = np.random.default_rng(derive_seed(experiment.seed, "dp-fedavg-noise"))
        sampled: Strategy = strategy
        if cfg.client_sampling == "poisson":
            if type(strategy).configure_train is not FedAvg.configure_train:
                raise ConfigError(
                    "privacy.client-sampling: 'poisson' needs FedAvg's train "
                    f"messages (the same for every client); strategy "
                    f"{experiment.strategy.name!r} built {type(strategy).__name__}; "
                    "use privacy.client-sampling = 'fixed'"
                )
            sampled = PoissonSampling(
                strategy, sample_rate=sample_rate(experiment), seed=experiment.seed
            )
        mean = FixedDenominatorMean(
            sampled, denominator=denominator, weight_key=strategy.weighted_by_key
        )
        wrapped: Strategy
        if cfg.clipping == "adaptive":
            check_adaptive_noise(cfg, sigma, denominator)
            wrapped = AdaptiveClipping(
                mean,
                noise_multiplier=sigma,
                count_stddev=count_stddev(cfg, denominator),
                denominator=denominator,
                rng=rng,
                initial_clipping_norm=cfg.clipping_norm,
                target_unclipped_quantile=cfg.target_unclipped_quantile,
                clip_norm_lr=cfg.clip_norm_lr,
                count_release=cfg.count_release,
            )
        else:
            wrapped = FixedClipping(
                mean,
                noise_multiplier=sigma,
                clipping_norm=cfg.clipping_norm,
                denominator=denominator,
                rng=rng,
            )
        return DpFedAvgAccounting(
            wrapped,
            noise_multiplier=sigma,
            sample_rate=sample_rate(experiment),
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
        check_adaptive_noise(
            experiment.privacy, sigma, expected_clients_per_round(experiment)
        )

    @classmethod
    def summary_fields(cls, experiment: Experiment) -> dict[str, Any]:
        """``accounting``: :func:`accounting_label`."""
        return {"accounting": accounting_label(experiment)}
