"""Full-model local training: the client side of FedAvg."""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from fedsim import privacy
from fedsim.core.experiment import Experiment
from fedsim.core.messages import ARRAYS, METRICS, NUM_EXAMPLES
from fedsim.core.seeding import derive_seed
from fedsim.learn.base import build_model
from fedsim.learn.data import ClientData, DatasetInfo
from fedsim.learn.training import (
    evaluate,
    evaluation_metrics,
    local_fit,
    num_examples,
)


class FullModelClient:
    """Loads the global model, trains every parameter, returns the whole model.

    Message contract (see :mod:`strategies.fedavg`): receives ``arrays`` (global
    state dict); replies ``arrays`` (local state dict) and ``metrics`` with
    ``loss`` and ``num-examples``.
    """

    def __init__(self, experiment: Experiment, info: DatasetInfo, device: torch.device):
        self.experiment = experiment
        self.device = device
        # Built once per process and reused for every client and round.
        self.model = build_model(experiment.model, info, experiment.seed).to(device)

    def _load(self, content: RecordDict) -> None:
        self.model.load_state_dict(content.array_records[ARRAYS].to_torch_state_dict())

    def train(
        self,
        content: RecordDict,
        data: ClientData,
        *,
        server_round: int,
        state: RecordDict,
    ) -> RecordDict:
        """One round of local training from the received global model."""
        exp = self.experiment
        self._load(content)
        stats, extra = local_fit(
            self.model,
            data.train,
            exp,
            seed=derive_seed(exp.seed, "train", server_round, data.partition_id),
            device=self.device,
            state=state,
            mechanism=privacy.client_mechanism(exp),
        )
        local = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        metrics: dict[str, Any] = {
            "loss": stats.loss,
            NUM_EXAMPLES: num_examples(stats, data.train),
            **extra,
        }
        return RecordDict({ARRAYS: ArrayRecord(local), METRICS: MetricRecord(metrics)})

    def evaluate(
        self,
        content: RecordDict,
        data: ClientData,
        *,
        server_round: int,
        state: RecordDict,
    ) -> RecordDict:
        """Loss and accuracy of the received global model on the local test split."""
        self._load(content)
        stats = evaluate(self.model, data.test, device=self.device)
        return RecordDict({METRICS: evaluation_metrics(stats)})
