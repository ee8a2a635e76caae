"""Privacy mechanisms: what wraps a client's local training, and the server.

A client mechanism receives the model, optimizer and loader a client algorithm
built and runs the local epochs, possibly wrapping them first (Opacus for DP-SGD).
It keeps whatever it must remember across rounds in the client's ``state``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Protocol

import torch
from flwr.app import RecordDict
from torch import nn
from torch.utils.data import DataLoader

from fedsim import registry
from fedsim.config import Experiment
from fedsim.training import TrainStats, train_epochs


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


class NoPrivacy:
    """Plain local training."""

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
        return train_epochs(model, loader, optimizer, epochs=epochs, device=device), {}


@lru_cache(maxsize=2)
def client_mechanism(experiment: Experiment) -> ClientMechanism:
    """The client-side mechanism of ``privacy.mechanism`` (one per process)."""
    factory = registry.PRIVACY[experiment.privacy.mechanism].load()
    return factory(experiment)  # type: ignore[no-any-return]
