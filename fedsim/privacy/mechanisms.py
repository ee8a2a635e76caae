"""Privacy mechanisms: what wraps a client's local training, and the server.

A mechanism is a class registered in :data:`fedsim.core.registry.PRIVACY`. An instance
is the client side: it receives the model, optimizer and loader a client algorithm
built and runs the local epochs, possibly wrapping them first (Opacus for DP-SGD),
keeping whatever it must remember across rounds in the client's ``state``. Its
classmethods are the server side: :meth:`NoPrivacy.wrap_strategy` wraps the
strategy the ServerApp built, :meth:`NoPrivacy.preflight` checks the experiment
against the model and data before any training.

Mechanisms:

- ``none`` (:class:`NoPrivacy`): plain local training.
- ``dp-sgd`` (:class:`DpSgd`): sample-level DP. Abadi et al., "Deep Learning with
  Differential Privacy" (CCS 2016), with Opacus' ``PrivacyEngine.make_private``
  (per-example clipping, Gaussian noise, Poisson sampling) around whatever the
  client algorithm trains. Each client's accountant history lives in its state and
  accumulates over rounds; replies carry the cumulative ``epsilon``, or
  ``declined = 1`` when the next round would exceed ``privacy.target-epsilon``.
  On the server, :class:`PrivacyBudgetStrategy` keeps declined replies out of the
  aggregate, records ``epsilon-max``/``epsilon-mean`` per round and stops the run
  when every client has declined.
- ``dp-fedavg`` (:class:`DpFedAvg`): client-level DP. McMahan et al., "Learning
  Differentially Private Recurrent Language Models" (ICLR 2018); adaptive clipping
  from Andrew et al., "Differentially Private Learning with Adaptive Clipping"
  (NeurIPS 2021). Flower's server-side clipping wrappers around a uniformly
  weighted FedAvg; :class:`DpFedAvgAccounting` records the server's ``epsilon``
  per round.

Reply metrics added by DP-SGD (keys below): ``epsilon``, ``noise-multiplier`` and,
when a client declines, ``declined`` (with ``num-examples = 0``).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any, Protocol, cast

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import nn
from torch.utils.data import DataLoader

from fedsim.privacy import accounting
from fedsim.core import registry
from fedsim.core.config import ConfigError, Experiment, PrivacyConfig
from fedsim.learn.data import FederatedData
from fedsim.core.messages import METRICS, PARTITION_ID
from fedsim.engine.recorder import RunStopped
from fedsim.learn.training import TrainStats, train_epochs
from fedsim.protocol.wrapping import DelegatingStrategy

#: Cumulative epsilon of a client (reply metric) or of the server (dp-fedavg).
EPSILON = "epsilon"
#: Reply metric: 1 when the client declined to train (budget spent).
DECLINED = "declined"
#: Reply / server metric: the noise multiplier in use.
NOISE_MULTIPLIER = "noise-multiplier"
#: Aggregated train metrics added by :class:`PrivacyBudgetStrategy`.
EPSILON_MAX = "epsilon-max"
EPSILON_MEAN = "epsilon-mean"
CLIENTS_DECLINED = "clients-declined"
#: Server metric of dp-fedavg: the clipping norm used this round.
CLIPPING_NORM = "clipping-norm"
#: Key of the DP-SGD accountant history in a client's ``context.state``.
STATE_KEY = "dp-sgd-accountant"


class ClientMechanism(Protocol):
    """Runs local training under a privacy mechanism."""

    def fit(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loader: DataLoader,
        *,
        epochs: int,
        device: torch.device,
        state: RecordDict,
    ) -> tuple[TrainStats, dict[str, float]]:
        """Train; return statistics and metrics to report (e.g. ``epsilon``)."""
        ...


class PerSampleGradientError(RuntimeError):
    """DP-SGD cannot compute correct per-example gradients for this model."""


class NoPrivacy:
    """Plain local training; the strategy is used as built."""

    def __init__(self, experiment: Experiment):
        self.experiment = experiment

    def fit(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loader: DataLoader,
        *,
        epochs: int,
        device: torch.device,
        state: RecordDict,
    ) -> tuple[TrainStats, dict[str, float]]:
        """Run :func:`fedsim.learn.training.train_epochs`; no extra metrics."""
        return train_epochs(model, loader, optimizer, epochs=epochs, device=device), {}

    @classmethod
    def wrap_strategy(cls, strategy: Strategy, experiment: Experiment) -> Strategy:
        """The server-side strategy under this mechanism (unchanged here)."""
        return strategy

    @classmethod
    def preflight(
        cls, experiment: Experiment, model: nn.Module, data: FederatedData
    ) -> None:
        """Check the experiment against its model and data before training."""


# -- DP-SGD: client side ---------------------------------------------------------


def load_history(state: RecordDict) -> list[accounting.Step]:
    """The DP-SGD accountant history kept in a client's state (empty at first)."""
    if STATE_KEY not in state.config_records:
        return []
    record = state.config_records[STATE_KEY]
    sigmas = cast(list[float], record["noise-multiplier"])
    rates = cast(list[float], record["sample-rate"])
    steps = cast(list[int], record["steps"])
    return [
        (float(s), float(q), int(n))
        for s, q, n in zip(sigmas, rates, steps, strict=True)
    ]


def save_history(state: RecordDict, history: Sequence[accounting.Step]) -> None:
    """Store the accountant history in a client's state (a few numbers)."""
    state[STATE_KEY] = ConfigRecord(
        {
            "noise-multiplier": [float(s) for s, _, _ in history],
            "sample-rate": [float(q) for _, q, _ in history],
            "steps": [int(n) for _, _, n in history],
        }
    )


def check_batchnorm(model: nn.Module, model_name: str) -> None:
    """Reject BatchNorm, whose statistics mix the examples of a batch."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise ConfigError(
                f"model.name: {model_name!r} has BatchNorm ({name or 'the model'}: "
                f"{type(module).__name__}), which mixes the examples of a batch and "
                "breaks per-example clipping under privacy.mechanism = 'dp-sgd'; use "
                "a model with GroupNorm (torch.nn.GroupNorm) or LayerNorm instead"
            )


def check_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The optimizer must hold exactly the model's trainable parameters.

    A stale reference (e.g. a parameter replaced after the optimizer was built,
    the root cause of Opacus issue #820 with PEFT) would train silently nothing.
    """
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    missing = [n for i, n in trainable.items() if i not in held]
    foreign = len(held - trainable.keys())
    if missing or foreign:
        raise PerSampleGradientError(
            "DP-SGD: the optimizer does not hold the model's trainable parameters "
            f"(missing: {', '.join(missing[:5]) or 'none'}; {foreign} not in the "
            "model); build the optimizer after wrapping the model (e.g. with peft)"
        )


def check_grad_samples(
    named: Sequence[tuple[str, nn.Parameter]], batch_size: int
) -> None:
    """Every trainable parameter must have a per-example gradient of the batch."""
    bad = []
    for name, p in named:
        sample = getattr(p, "grad_sample", None)
        if isinstance(sample, list):
            sample = torch.cat(sample) if sample else None
        if sample is None or tuple(sample.shape) != (batch_size, *p.shape):
            shape = None if sample is None else tuple(sample.shape)
            bad.append(f"{name} (got {shape}, want {(batch_size, *p.shape)})")
    if bad:
        raise PerSampleGradientError(
            "DP-SGD: no correct per-example gradient for trainable parameter(s) "
            f"{'; '.join(bad[:4])}; Opacus cannot compute them for how these "
            "parameters are used (e.g. one embedding shared by the whole batch)"
        )


def check_changed(
    named: Sequence[tuple[str, nn.Parameter]], before: Sequence[torch.Tensor]
) -> None:
    """After a noisy DP step every trainable parameter must have moved."""
    still = [n for (n, p), b in zip(named, before) if torch.equal(p.detach(), b)]
    if still:
        raise PerSampleGradientError(
            "DP-SGD: a noisy step left trainable parameter(s) unchanged: "
            f"{', '.join(still[:5])}; the optimizer is not updating the model it "
            "trains (see Opacus issue #820)"
        )


def dp_train_epochs(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: Any,
    *,
    epochs: int,
    device: torch.device,
    noise_multiplier: float,
) -> TrainStats:
    """Local epochs with an Opacus-wrapped model, optimizer and Poisson loader.

    Unlike :func:`fedsim.learn.training.train_epochs`, an empty Poisson batch is a real
    step (noise only), as the accountant counts it. The first step is guarded:
    every trainable parameter must get a per-example gradient, and with noise
    every trainable parameter must change.
    """
    inner = getattr(model, "_module", model)
    named = [(n, p) for n, p in inner.named_parameters() if p.requires_grad]
    model.train()
    total, seen, steps = 0.0, 0, 0
    guarded = False
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            if len(y) == 0:
                for _, p in named:
                    # a zero-example batch: Opacus then adds noise only
                    p.grad_sample = p.new_zeros((0, *p.shape))  # type: ignore[union-attr]
                optimizer.step()
                steps += 1
                continue
            x, y = x.to(device), y.to(device)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            before: list[torch.Tensor] = []
            if not guarded:
                check_grad_samples(named, len(y))
                before = [p.detach().clone() for _, p in named]
            optimizer.step()
            if not guarded:
                if noise_multiplier > 0:
                    check_changed(named, before)
                guarded = True
            total += float(loss.detach()) * len(y)
            seen += len(y)
            steps += 1
    return TrainStats(total / max(seen, 1), seen, steps)


class DpSgd(NoPrivacy):
    """DP-SGD with Opacus in every client, accounted over the whole run.

    Noise: ``privacy.noise-multiplier`` when > 0; otherwise calibrated from
    ``privacy.target-epsilon`` for the client's whole run (``rounds`` x ``epochs``
    x steps per epoch at its sample rate), so that the epsilon after the last
    round is just under the target. With both set, the noise is fixed and the
    target is a budget: a client whose next round would exceed it declines.
    """

    def noise_multiplier(self, sample_rate: float, steps_per_run: int) -> float:
        """Noise for a client with this schedule."""
        cfg = self.experiment.privacy
        if cfg.noise_multiplier > 0 or cfg.target_epsilon == 0:
            return cfg.noise_multiplier
        return accounting.calibrate_noise(
            cfg.target_epsilon,
            cfg.target_delta,
            sample_rate,
            steps_per_run,
            cfg.accountant,
        )

    def fit(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loader: DataLoader,
        *,
        epochs: int,
        device: torch.device,
        state: RecordDict,
    ) -> tuple[TrainStats, dict[str, float]]:
        """One round of DP-SGD; reports the cumulative ``epsilon``."""
        from opacus import PrivacyEngine

        exp, cfg = self.experiment, self.experiment.privacy
        num_examples = len(loader.dataset)  # type: ignore[arg-type]
        batch_size = int(loader.batch_size or 1)
        history = load_history(state)
        if num_examples == 0:  # nothing to train on, nothing spent
            eps = accounting.epsilon(history, cfg.target_delta, cfg.accountant)
            return TrainStats(0.0, 0, 0), {EPSILON: eps}
        sample_rate, per_round, per_run = accounting.planned_steps(
            num_examples, batch_size, epochs, exp.rounds
        )
        sigma = self.noise_multiplier(sample_rate, per_run)
        planned = accounting.merge(history, (sigma, sample_rate, per_round))
        if cfg.target_epsilon > 0:
            after = accounting.epsilon(planned, cfg.target_delta, cfg.accountant)
            if after > cfg.target_epsilon:
                spent = accounting.epsilon(history, cfg.target_delta, cfg.accountant)
                declined = {EPSILON: spent, DECLINED: 1.0, NOISE_MULTIPLIER: sigma}
                return TrainStats(0.0, 0, 0), declined
        check_batchnorm(model, exp.model.name)
        check_optimizer(model, optimizer)
        model.train()  # Opacus validates training mode; evaluation left it in eval
        with warnings.catch_warnings():
            # Opacus warns about secure_mode (a CSPRNG) being off: simulations seed.
            warnings.simplefilter("ignore", UserWarning)
            engine = PrivacyEngine(accountant=cfg.accountant)
            engine.accountant.history = list(history)
            private_model, private_optimizer, private_loader = engine.make_private(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=sigma,
                max_grad_norm=cfg.max_grad_norm,
                poisson_sampling=True,
            )
        try:
            if (len(private_loader), 1 / len(private_loader)) != (
                per_round // epochs,
                sample_rate,
            ):
                raise RuntimeError(
                    f"Opacus' Poisson loader has {len(private_loader)} steps per "
                    f"epoch; fedsim planned {per_round // epochs}"
                )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                stats = dp_train_epochs(
                    private_model,
                    private_loader,
                    private_optimizer,
                    epochs=epochs,
                    device=device,
                    noise_multiplier=sigma,
                )
        finally:
            private_model.to_standard_module()  # remove Opacus' hooks from `model`
        history = list(engine.accountant.history)
        save_history(state, history)  # what Opacus accounted is what was spent
        if history != planned:  # the budget check assumed `planned`: say so
            raise RuntimeError(
                f"DP-SGD: Opacus accounted {history}, fedsim planned {planned}"
            )
        eps = accounting.epsilon(history, cfg.target_delta, cfg.accountant)
        return stats, {EPSILON: eps, NOISE_MULTIPLIER: sigma}

    @classmethod
    def wrap_strategy(cls, strategy: Strategy, experiment: Experiment) -> Strategy:
        """Budget bookkeeping and epsilon statistics around ``strategy``."""
        return PrivacyBudgetStrategy(
            strategy,
            num_clients=experiment.federation.clients,
            target_epsilon=experiment.privacy.target_epsilon,
        )

    @classmethod
    def preflight(
        cls, experiment: Experiment, model: nn.Module, data: FederatedData
    ) -> None:
        """Reject BatchNorm, models without per-example gradients, and budgets
        that no noise can meet, before any training."""
        check_batchnorm(model, experiment.model.name)
        from opacus.validators import ModuleValidator

        problems = ModuleValidator.validate(model, strict=False)
        if problems:
            raise ConfigError(
                f"model.name: {experiment.model.name!r} cannot be trained with "
                f"DP-SGD: {problems[0]}"
            )
        if experiment.peft.method == "none":
            probe_per_sample_gradients(model, data, experiment.model.name)
        cfg = experiment.privacy
        if cfg.noise_multiplier == 0:
            for pid in range(experiment.federation.clients):
                n = len(data.client(pid).train)
                if n == 0:
                    continue
                q, _, per_run = accounting.planned_steps(
                    n,
                    experiment.train.batch_size,
                    experiment.train.epochs,
                    experiment.rounds,
                )
                try:
                    # RDP here (fast); the run calibrates with privacy.accountant.
                    accounting.calibrate_noise(
                        cfg.target_epsilon, cfg.target_delta, q, per_run, "rdp"
                    )
                except accounting.BudgetTooSmall as err:
                    raise ConfigError(f"privacy.target-epsilon: {err}") from None


def probe_per_sample_gradients(
    model: nn.Module, data: FederatedData, model_name: str
) -> None:
    """One Opacus backward pass on two examples; every parameter must get a
    per-example gradient of the right shape (raises :class:`ConfigError`)."""
    from opacus import GradSampleModule

    probe = copy.deepcopy(model).cpu()
    x = torch.from_numpy(data.pool.x[:2])
    y = torch.from_numpy(data.pool.y[:2])
    wrapped = GradSampleModule(probe)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            F.cross_entropy(wrapped(x), y).backward()
        named = [(n, p) for n, p in probe.named_parameters() if p.requires_grad]
        check_grad_samples(named, len(y))
    except (PerSampleGradientError, RuntimeError, ValueError) as err:
        raise ConfigError(
            f"model.name: {model_name!r} cannot be trained in full with DP-SGD: "
            f"{str(err).splitlines()[0]}; use another model or train LoRA adapters "
            "(peft.method)"
        ) from None
    finally:
        wrapped.to_standard_module()


# -- DP-SGD: server side ---------------------------------------------------------


def _metrics(reply: Message) -> MetricRecord:
    return reply.content[METRICS]  # type: ignore[return-value]


class PrivacyBudgetStrategy(DelegatingStrategy):
    """Server side of DP-SGD: keeps declined replies out of aggregation.

    Adds ``epsilon-max``, ``epsilon-mean`` (over the clients that replied) and
    ``clients-declined`` to the aggregated train metrics. Once every client of
    the federation has declined (a spent budget never comes back) the run stops
    cleanly with :class:`fedsim.engine.recorder.RunStopped`.
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


# -- DP-FedAvg -------------------------------------------------------------------


def clients_per_round(experiment: Experiment) -> int:
    """How many clients Flower's FedAvg samples each round."""
    fed = experiment.federation
    return max(int(fed.clients * fed.fraction_train), 1)


def dp_fedavg_noise(experiment: Experiment) -> float:
    """The server's noise multiplier: given, or calibrated for all ``rounds``.

    Rounds are composed as Poisson-subsampled Gaussian mechanisms with sample
    rate ``clients_per_round / clients`` (see ``docs/privacy.md`` on Flower's
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


def _adaptive_clipping_class() -> type:
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideAdaptiveClipping

    class AdaptiveClipping(DifferentialPrivacyServerSideAdaptiveClipping):
        """Flower's server-side adaptive clipping with Andrew et al.'s update.

        Flower 1.41 counts the *clipped* updates but applies the paper's rule,
        written for the *unclipped* ones, so its norm runs away from the target
        quantile; and it updates the norm before noising the aggregate, so the
        noise follows the next round's norm instead of the one that clipped.
        This class keeps the norm that clipped until the aggregate is noised,
        then moves it by ``exp(-lr * (unclipped_fraction - target_quantile))``.
        Its update noise multiplier is set by
        :func:`fedsim.privacy.accounting.adaptive_update_noise`.
        """

        _next_norm: float | None = None

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

    return AdaptiveClipping


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
        from flwr.serverapp.strategy import (
            DifferentialPrivacyServerSideFixedClipping,
            FedAvg,
        )

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
            wrapped = _adaptive_clipping_class()(
                uniform,
                sigma,
                sampled,
                initial_clipping_norm=cfg.clipping_norm,
                target_clipped_quantile=cfg.target_unclipped_quantile,
                clip_norm_lr=cfg.clip_norm_lr,
                clipped_count_stddev=stddev,
            )
            wrapped.noise_multiplier = accounting.adaptive_update_noise(sigma, stddev)
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


# -- dispatch --------------------------------------------------------------------


def mechanism_class(experiment: Experiment) -> type[NoPrivacy]:
    """The class registered for ``privacy.mechanism``."""
    return registry.PRIVACY[experiment.privacy.mechanism].load()  # type: ignore[no-any-return]


@lru_cache(maxsize=2)
def client_mechanism(experiment: Experiment) -> ClientMechanism:
    """The client-side mechanism of ``privacy.mechanism`` (one per process)."""
    return mechanism_class(experiment)(experiment)


def wrap_strategy(strategy: Strategy, experiment: Experiment) -> Strategy:
    """The strategy the ServerApp runs under ``privacy.mechanism``."""
    return mechanism_class(experiment).wrap_strategy(strategy, experiment)


def preflight(experiment: Experiment, model: nn.Module, data: FederatedData) -> None:
    """Privacy checks before any training (raises :class:`ConfigError`)."""
    mechanism_class(experiment).preflight(experiment, model, data)
