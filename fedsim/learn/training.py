"""The one local training loop, evaluation, and the helpers around them.

Every client algorithm trains through :func:`train_epochs`: full-model training,
LoRA adapters and DP-SGD alike. What differs is passed in: the loss
(``loss(model, x, y)``, cross-entropy by default), a penalty (``penalty()``, a
term of the trained parameters alone, e.g. FedProx's proximal term or
SCAFFOLD's correction), and :class:`TrainHooks` that a privacy mechanism
overrides (DP-SGD: a noise-only step on an empty Poisson
batch, guards around the first step). Nothing here knows which algorithm or
privacy mechanism is running.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import MetricRecord, RecordDict
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedsim.core.experiment import Experiment, TrainConfig
from fedsim.core.messages import NUM_EXAMPLES
from fedsim.learn.data import Arrays

#: ``loss(model, x, y)``: the mean loss of a batch, to minimise.
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


#: ``penalty()``: a term of the trained parameters alone (no data; it closes over
#: them), added to every batch's objective. Kept apart from the loss because a
#: mechanism that privatises per-example gradients (DP-SGD) never sees a term
#: outside the per-example loss: it adds the penalty's gradient after
#: privatising instead (post-processing, no privacy cost).
Penalty = Callable[[], torch.Tensor]


def cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The default loss: cross-entropy of the model's logits."""
    return F.cross_entropy(model(x), y)


def tensors(arrays: Arrays) -> TensorDataset:
    return TensorDataset(torch.from_numpy(arrays.x), torch.from_numpy(arrays.y))


def make_loader(arrays: Arrays, batch_size: int, *, seed: int) -> DataLoader:
    """Shuffled loader whose order depends only on ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        tensors(arrays), batch_size=batch_size, shuffle=True, generator=generator
    )


def make_optimizer(
    params: Iterable[nn.Parameter], cfg: TrainConfig
) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )


@dataclass(frozen=True)
class TrainStats:
    """Mean training loss over all examples seen, how many were seen, and how
    many optimizer steps were taken."""

    loss: float
    examples: int
    steps: int


class TrainHooks:
    """Extension points of :func:`train_epochs`; the defaults train plainly."""

    def empty_batch(self, optimizer: torch.optim.Optimizer) -> bool:
        """A batch without examples (Poisson sampling can draw one). Return
        True if it was a step (DP-SGD: noise only); the default skips it."""
        return False

    def before_step(self, batch_size: int) -> None:
        """After the backward pass, before ``optimizer.step()``."""

    def after_step(self) -> None:
        """After ``optimizer.step()``."""


_PLAIN = TrainHooks()


def train_epochs(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    device: torch.device,
    loss: LossFn = cross_entropy,
    penalty: Penalty | None = None,
    hooks: TrainHooks = _PLAIN,
) -> TrainStats:
    """Run ``epochs`` passes of ``loss`` (+ ``penalty``) minimisation over
    ``loader``. The reported loss is the data loss (without the penalty), so
    runs with and without one compare."""
    model.train()
    total, seen, steps = 0.0, 0, 0
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            if len(y) == 0:
                steps += int(hooks.empty_batch(optimizer))
                continue
            x, y = x.to(device), y.to(device)
            value = loss(model, x, y)
            objective = value if penalty is None else value + penalty()
            objective.backward()
            hooks.before_step(len(y))
            optimizer.step()
            hooks.after_step()
            total += float(value.detach()) * len(y)
            seen += len(y)
            steps += 1
    return TrainStats(total / max(seen, 1), seen, steps)


def num_examples(stats: TrainStats, train: Arrays) -> int:
    """A client's aggregation weight: its local train-set size (McMahan et al.'s
    n_k), or 0 when it did not train (e.g. it declined: privacy budget spent)."""
    return len(train) if stats.steps > 0 else 0


@dataclass(frozen=True)
class EvalStats:
    """Mean loss and accuracy over a split."""

    loss: float
    accuracy: float
    examples: int


@torch.no_grad()
def evaluate(
    model: nn.Module, arrays: Arrays, *, device: torch.device, batch_size: int = 512
) -> EvalStats:
    """Cross-entropy loss and accuracy of ``model`` on ``arrays``."""
    model.eval()
    if len(arrays) == 0:
        return EvalStats(float("nan"), float("nan"), 0)
    loss, correct = 0.0, 0
    for start in range(0, len(arrays), batch_size):
        x = torch.from_numpy(arrays.x[start : start + batch_size]).to(device)
        y = torch.from_numpy(arrays.y[start : start + batch_size]).to(device)
        logits = model(x)
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(dim=1) == y).sum())
    n = len(arrays)
    return EvalStats(loss / n, correct / n, n)


class Mechanism(Protocol):
    """What runs the local epochs (a privacy mechanism's client side)."""

    def fit(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loader: DataLoader,
        *,
        epochs: int,
        device: torch.device,
        state: RecordDict,
        loss: LossFn = ...,
        penalty: Penalty | None = ...,
    ) -> tuple[TrainStats, dict[str, float]]: ...


def local_fit(
    model: nn.Module,
    train: Arrays,
    exp: Experiment,
    *,
    seed: int,
    device: torch.device,
    state: RecordDict,
    mechanism: Mechanism,
    loss: LossFn = cross_entropy,
    penalty: Penalty | None = None,
) -> tuple[TrainStats, dict[str, float]]:
    """Local training shared by every client algorithm.

    Builds a seeded loader and an optimizer over the trainable parameters and
    hands them, with the model, ``loss`` and ``penalty``, to ``mechanism``
    (the experiment's privacy mechanism,
    :func:`fedsim.privacy.client_mechanism`), which may wrap them (DP-SGD)
    before running :func:`train_epochs`. Returns the training
    statistics and the mechanism's metrics (e.g. cumulative ``epsilon``).
    """
    torch.manual_seed(seed)
    loader = make_loader(train, exp.train.batch_size, seed=seed)
    optimizer = make_optimizer(model.parameters(), exp.train)
    return mechanism.fit(
        model,
        optimizer,
        loader,
        epochs=exp.train.epochs,
        device=device,
        state=state,
        loss=loss,
        penalty=penalty,
    )


def evaluation_metrics(stats: EvalStats) -> MetricRecord:
    """The metrics of an ``evaluate`` reply (the FedAvg contract's keys)."""
    return MetricRecord(
        {"loss": stats.loss, "accuracy": stats.accuracy, NUM_EXAMPLES: stats.examples}
    )


def state_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's state dict as numpy arrays (CPU copies)."""
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
