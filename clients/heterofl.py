"""HeteroFL's client side: trains the width-sliced sub-model it is sent.

See :mod:`fedsim.strategies.heterofl` for the paper, the deviations and the message
contract.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from torch import nn

from fedsim.clients.full import evaluation_reply, fit_round, train_metrics
from fedsim.core.capacity import capacity_of
from fedsim.core.experiment import Experiment
from fedsim.core.messages import ARRAYS, METRICS
from fedsim.learn.base import build_model
from fedsim.learn.capacity import parameter_count, sub_model, training_memory_bytes
from fedsim.learn.data import ClientData, DatasetInfo

#: Bytes in a megabyte (powers of 1000, as the report's byte columns).
MB = 1e6


class HeteroFLClient:
    """Loads its slice of the global model, trains it, returns it.

    One sub-model per width is built once per client process (from the full
    model) and reused; each message loads the received slice into it.

    Parameters
    ----------
    experiment : Experiment
        The run's configuration (``strategy.capacities``).
    info : DatasetInfo
        Input shape and classes, to build the model.
    device : torch.device
        Where the models live and train.
    """

    def __init__(self, experiment: Experiment, info: DatasetInfo, device: torch.device):
        self.experiment = experiment
        self.info = info
        self.device = device
        self.full = build_model(experiment.model, info, experiment.seed)
        self._models: dict[float, nn.Module] = {}

    def width(self, partition_id: int) -> float:
        """The client's width ratio."""
        return capacity_of(self.experiment.strategy.options.capacities, partition_id)

    def model_for(self, partition_id: int) -> nn.Module:
        """The (cached) sub-model at the client's width."""
        ratio = self.width(partition_id)
        if ratio not in self._models:
            self._models[ratio] = sub_model(self.full, ratio).to(self.device)
        return self._models[ratio]

    def cost(self, model: nn.Module) -> dict[str, float]:
        """Parameter count and counted training memory of ``model``."""
        memory = training_memory_bytes(
            model,
            self.info.input_shape,
            self.experiment.train.batch_size,
            optimizer_slots=int(self.experiment.train.momentum > 0),
        )
        return {"params": float(parameter_count(model)), "memory-mb": memory / MB}

    def load(self, content: RecordDict, partition_id: int) -> nn.Module:
        model = self.model_for(partition_id)
        model.load_state_dict(content.array_records[ARRAYS].to_torch_state_dict())
        return model

    def train(
        self,
        content: RecordDict,
        data: ClientData,
        *,
        server_round: int,
        state: RecordDict,
    ) -> RecordDict:
        """One round of local training of the received sub-model."""
        exp = self.experiment
        model = self.load(content, data.partition_id)
        stats, extra = fit_round(
            model,
            data,
            exp,
            server_round=server_round,
            device=self.device,
            state=state,
        )
        metrics = train_metrics(
            stats,
            data,
            extra,
            width=self.width(data.partition_id),
            **self.cost(model),
        )
        local = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        return RecordDict({ARRAYS: ArrayRecord(local), METRICS: MetricRecord(metrics)})

    def evaluate(
        self,
        content: RecordDict,
        data: ClientData,
        *,
        server_round: int,
        state: RecordDict,
    ) -> RecordDict:
        """Clean (and, with ``robust.epsilon`` > 0, PGD) loss and accuracy of the
        client's slice of the global model on its local test split."""
        return evaluation_reply(
            self.load(content, data.partition_id),
            data,
            self.experiment,
            server_round=server_round,
            device=self.device,
            width=self.width(data.partition_id),
        )
