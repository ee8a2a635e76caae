"""What the engine builds once and hands to a family's server side."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord
from torch import nn

from fedsim.core.experiment import Experiment
from fedsim.core.messages import ARRAYS, CONFIG, NUM_EXAMPLES
from fedsim.learn.data import FederatedData

#: Flower ``FedAvg``'s keyword arguments naming fedsim's message keys: weights
#: under ``num-examples``, arrays under ``arrays``, config under ``config``.
MESSAGE_KEYS = {
    "weighted_by_key": NUM_EXAMPLES,
    "arrayrecord_key": ARRAYS,
    "configrecord_key": CONFIG,
}


def with_message_keys(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` of a ``FedAvg`` subclass, with :data:`MESSAGE_KEYS` where they
    do not say otherwise."""
    return {**MESSAGE_KEYS, **kwargs}


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

    def fedavg_options(self) -> dict[str, Any]:
        """Keyword arguments of Flower's ``FedAvg`` (and its subclasses) from
        ``[federation]`` and fedsim's message keys: sampling fractions, every
        client available before a round, weights under ``num-examples``."""
        fed = self.experiment.federation
        return {
            "fraction_train": fed.fraction_train,
            "fraction_evaluate": fed.fraction_evaluate,
            "min_train_nodes": 1,
            "min_evaluate_nodes": 1,
            "min_available_nodes": fed.clients,
            **MESSAGE_KEYS,
        }
