"""The local training loop and evaluation, shared by every client algorithm.

A client algorithm builds the model, optimizer and data loader (possibly wrapped,
e.g. by Opacus) and hands them to :func:`train_epochs`; nothing here knows which
algorithm or privacy mechanism is running.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import MetricRecord, RecordDict
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedsim.core.config import Experiment, ResourcesConfig, TrainConfig
from fedsim.learn.data import Arrays


def resolve_device(cfg: ResourcesConfig) -> torch.device:
    """The one place that picks the torch device of a process."""
    if cfg.device == "cuda" or (cfg.device == "auto" and cfg.num_gpus > 0):
        if not torch.cuda.is_available():
            if cfg.device == "cuda":
                raise RuntimeError("resources.device = 'cuda' but CUDA is unavailable")
            return torch.device("cpu")
        return torch.device("cuda")
    return torch.device("cpu")


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from any parts (run seed, round, partition id...)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


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
    """Mean training loss over all examples seen, and how many were seen."""

    loss: float
    examples: int
    steps: int


def train_epochs(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    device: torch.device,
) -> TrainStats:
    """Run ``epochs`` passes of cross-entropy SGD over ``loader``."""
    model.train()
    total, seen, steps = 0.0, 0, 0
    for _ in range(epochs):
        for x, y in loader:
            if len(y) == 0:  # Poisson sampling can draw an empty batch
                continue
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(y)
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


def local_fit(
    model: nn.Module,
    train: Arrays,
    exp: Experiment,
    *,
    seed: int,
    device: torch.device,
    state: RecordDict,
) -> tuple[TrainStats, dict[str, float]]:
    """Local training shared by every client algorithm.

    Builds a seeded loader and an optimizer over the trainable parameters and
    hands them, with the model, to the experiment's privacy mechanism, which may
    wrap them (DP-SGD) before running :func:`train_epochs`. Returns the training
    statistics and the mechanism's metrics (e.g. cumulative ``epsilon``).
    """
    from fedsim.privacy.mechanisms import client_mechanism

    torch.manual_seed(seed)
    loader = make_loader(train, exp.train.batch_size, seed=seed)
    optimizer = make_optimizer(model.parameters(), exp.train)
    mechanism = client_mechanism(exp)
    return mechanism.fit(
        model, optimizer, loader, epochs=exp.train.epochs, device=device, state=state
    )


def evaluation_metrics(stats: EvalStats) -> MetricRecord:
    """The metrics of an ``evaluate`` reply (the FedAvg contract's keys)."""
    from fedsim.core.messages import NUM_EXAMPLES

    return MetricRecord(
        {"loss": stats.loss, "accuracy": stats.accuracy, NUM_EXAMPLES: stats.examples}
    )


def state_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's state dict as numpy arrays (CPU copies)."""
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
