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
from fedsim.learn.robust import robust_metrics
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

    def load(self, content: RecordDict, state: RecordDict) -> None:
        """Put the weights this round starts from into the resident model: the
        received global model."""
        self.model.load_state_dict(content.array_records[ARRAYS].to_torch_state_dict())

    def keep(self, state: RecordDict) -> RecordDict:
        """What the train reply carries besides metrics: the local model."""
        local = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        return RecordDict({ARRAYS: ArrayRecord(local)})

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
        self.load(content, state)
        stats, extra = local_fit(
            self.model,
            data.train,
            exp,
            seed=derive_seed(exp.seed, "train", server_round, data.partition_id),
            device=self.device,
            state=state,
            mechanism=privacy.client_mechanism(exp),
        )
        metrics: dict[str, Any] = {
            "loss": stats.loss,
            NUM_EXAMPLES: num_examples(stats, data.train),
            **extra,
        }
        reply = self.keep(state)
        reply[METRICS] = MetricRecord(metrics)
        return reply

    def evaluate(
        self,
        content: RecordDict,
        data: ClientData,
        *,
        server_round: int,
        state: RecordDict,
    ) -> RecordDict:
        """Loss and accuracy of the model this client evaluates (the received
        global model) on its local test split; with ``robust.epsilon`` > 0 also
        its PGD loss and accuracy."""
        exp = self.experiment
        self.load(content, state)
        metrics = evaluation_metrics(
            evaluate(self.model, data.test, device=self.device)
        )
        seed = derive_seed(exp.seed, "pgd", server_round, data.partition_id)
        robust = robust_metrics(
            self.model, data.test, exp.robust, device=self.device, seed=seed
        )
        for key, value in robust.items():
            metrics[key] = value
        return RecordDict({METRICS: metrics})
