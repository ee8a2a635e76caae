"""What the engine builds once and hands to a family's server side."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord
from torch import nn

from fedsim.core.experiment import Experiment
from fedsim.learn.data import FederatedData


@dataclass(frozen=True)
class ServerSetup:
    """Built once by the ServerApp before the first round.

    Parameters
    ----------
    experiment : Experiment
        The validated experiment (the family's options in
        ``experiment.strategy.options``).
    data : FederatedData
        The dataset, its partitions and the held-out test set.
    model : nn.Module
        The model, on ``device``, with its initial weights.
    initial : ArrayRecord
        The model's initial state dict (what round 1 starts from).
    device : torch.device
        The server process's device.
    """

    experiment: Experiment
    data: FederatedData
    model: nn.Module
    initial: ArrayRecord
    device: torch.device

    @property
    def options(self) -> Any:
        """The family's own option table."""
        return self.experiment.strategy.options
