"""DP-SGD: sample-level differential privacy in every client.

Abadi et al., "Deep Learning with Differential Privacy" (CCS 2016), with Opacus'
``PrivacyEngine.make_private`` (per-example clipping, Gaussian noise, Poisson
sampling) around whatever the client algorithm trains, through the one training
loop (:func:`fedsim.learn.training.train_epochs`) with :class:`DpSgdGuard` as its
hooks. Each client's accountant history lives in its state and accumulates over
rounds; replies carry the cumulative ``epsilon``, or ``declined = 1`` when the
next round would exceed ``privacy.target-epsilon``. The server side is
:class:`fedsim.privacy.budget.PrivacyBudgetStrategy`.

Guarded in code (the Opacus + PEFT trap, Opacus issue #820): the optimizer must
hold exactly the model's trainable parameters; after the first step's backward
pass every trainable parameter must have a per-example gradient of the batch's
size; with noise, every trainable parameter must have changed after the first
step.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from typing import cast

import torch
from flwr.app import ConfigRecord, RecordDict
from flwr.serverapp.strategy import Strategy
from torch import nn
from torch.utils.data import DataLoader

from fedsim.core.errors import ConfigError
from fedsim.core.experiment import Experiment
from fedsim.learn.data import FederatedData
from fedsim.learn.tasks import task_for
from fedsim.learn.training import (
    LossFn,
    Penalty,
    TrainHooks,
    TrainStats,
    cross_entropy,
    train_epochs,
)
from fedsim.privacy import accounting
from fedsim.privacy.base import (
    DECLINED,
    EPSILON,
    NOISE_MULTIPLIER,
    NoPrivacy,
)
from fedsim.privacy.budget import PrivacyBudgetStrategy

#: Key of the DP-SGD accountant history in a client's ``context.state``.
STATE_KEY = "dp-sgd-accountant"


class PerSampleGradientError(RuntimeError):
    """DP-SGD cannot compute correct per-example gradients for this model."""


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


class DpSgdGuard(TrainHooks):
    """DP-SGD's hooks on the one training loop.

    An empty Poisson batch is a real step (noise only), as the accountant counts
    it. The first step is guarded: every trainable parameter must get a
    per-example gradient, and with noise every trainable parameter must change.
    """

    def __init__(self, model: nn.Module, noise_multiplier: float):
        inner = getattr(model, "_module", model)
        self.named = [(n, p) for n, p in inner.named_parameters() if p.requires_grad]
        self.noise_multiplier = noise_multiplier
        self.guarded = False
        self.before: list[torch.Tensor] = []

    def empty_batch(self, optimizer: torch.optim.Optimizer) -> bool:
        for _, p in self.named:
            # a zero-example batch: Opacus then adds noise only
            p.grad_sample = p.new_zeros((0, *p.shape))  # type: ignore[union-attr]
        optimizer.step()
        return True

    def before_step(self, batch_size: int) -> None:
        if not self.guarded:
            check_grad_samples(self.named, batch_size)
            self.before = [p.detach().clone() for _, p in self.named]

    def after_step(self) -> None:
        if not self.guarded:
            if self.noise_multiplier > 0:
                check_changed(self.named, self.before)
            self.guarded = True
            self.before = []


def penalty_after_noise(
    optimizer: torch.optim.Optimizer, penalty: Penalty
) -> torch.utils.hooks.RemovableHandle:
    """Add ``penalty``'s gradient to every parameter's privatised gradient
    right before ``optimizer`` (the optimizer Opacus wraps) updates them.

    Opacus replaces each gradient by the clipped, noised mean of the
    per-example gradients, so a term outside the per-example loss would be
    dropped silently; a term of the parameters alone can be added afterwards
    as post-processing, at no privacy cost.
    """

    def hook(opt: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        params = [p for group in opt.param_groups for p in group["params"]]
        with torch.enable_grad():
            grads = torch.autograd.grad(penalty(), params, allow_unused=True)
        for p, g in zip(params, grads, strict=True):
            if g is not None:
                if p.grad is None:
                    p.grad = g.detach().clone()
                else:
                    p.grad.add_(g)

    return optimizer.register_step_pre_hook(hook)  # type: ignore[arg-type]


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
        loss: LossFn = cross_entropy,
        penalty: Penalty | None = None,
    ) -> tuple[TrainStats, dict[str, float]]:
        """One round of DP-SGD; reports the cumulative ``epsilon``. ``loss`` is
        clipped per example; ``penalty``'s gradient is added after clipping and
        noise (:func:`penalty_after_noise`)."""
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
        handle = None
        if penalty is not None:
            handle = penalty_after_noise(private_optimizer.original_optimizer, penalty)
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
                stats = train_epochs(
                    private_model,
                    private_loader,
                    private_optimizer,
                    epochs=epochs,
                    device=device,
                    loss=loss,
                    hooks=DpSgdGuard(private_model, sigma),
                )
        finally:
            if handle is not None:
                handle.remove()
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
            probe_per_sample_gradients(
                model, data, experiment.model.name, task_for(experiment).loss
            )
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
    model: nn.Module, data: FederatedData, model_name: str, loss: LossFn = cross_entropy
) -> None:
    """One Opacus backward pass of ``loss`` (the task's) on two examples; every
    parameter must get a per-example gradient of the right shape (raises
    :class:`ConfigError`)."""
    from opacus import GradSampleModule

    probe = copy.deepcopy(model).cpu()
    x = torch.from_numpy(data.pool.x[:2])
    y = torch.from_numpy(data.pool.y[:2])
    wrapped = GradSampleModule(probe)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            loss(wrapped, x, y).backward()
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
