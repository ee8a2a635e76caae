"""What every privacy mechanism is: a client side that runs local training, and
server-side hooks (wrap the strategy, check the experiment before the run).

A mechanism is a class registered in :data:`fedsim.core.registry.PRIVACY`. An
instance is the client side: it receives the model, optimizer and loader a client
algorithm built and runs the local epochs with
:func:`fedsim.learn.training.train_epochs`, possibly wrapping them first
(Opacus for DP-SGD), keeping whatever it must remember across rounds in the
client's ``state``. Its classmethods are the server side.
"""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import RecordDict
from flwr.serverapp.strategy import Strategy
from torch import nn
from torch.utils.data import DataLoader

from fedsim.core.experiment import Experiment
from fedsim.learn.data import FederatedData
from fedsim.learn.training import (
    LossFn,
    Penalty,
    TrainStats,
    cross_entropy,
    train_epochs,
)

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
        loss: LossFn = cross_entropy,
        penalty: Penalty | None = None,
    ) -> tuple[TrainStats, dict[str, float]]:
        """Run :func:`fedsim.learn.training.train_epochs`; no extra metrics."""
        stats = train_epochs(
            model,
            loader,
            optimizer,
            epochs=epochs,
            device=device,
            loss=loss,
            penalty=penalty,
        )
        return stats, {}

    @classmethod
    def wrap_strategy(cls, strategy: Strategy, experiment: Experiment) -> Strategy:
        """The server-side strategy under this mechanism (unchanged here)."""
        return strategy

    @classmethod
    def preflight(
        cls, experiment: Experiment, model: nn.Module, data: FederatedData
    ) -> None:
        """Check the experiment against its model and data before training."""

    @classmethod
    def summary_fields(cls, experiment: Experiment) -> dict[str, Any]:
        """Entries this mechanism adds to ``summary.json`` (none here)."""
        return {}
