"""HeteroFL's client side: trains the width-sliced sub-model it is sent.

See :mod:`fedsim.strategies.heterofl` for the paper, the deviations and the message
contract.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch import nn

from fedsim.clients.full import evaluation_reply, fit_round, train_metrics
from fedsim.core.capacity import capacity_of
from fedsim.core.experiment import Experiment
from fedsim.core.messages import ARRAYS, METRICS
from fedsim.learn.base import build_model
from fedsim.learn.capacity import (
    LABEL_SPLIT,
    WidthHooks,
    label_split,
    parameter_count,
    sub_model,
    training_memory_bytes,
)
from fedsim.learn.data import ClientData, DatasetInfo

#: Bytes in a megabyte (powers of 1000, as the report's byte columns).
MB = 1e6


class HeteroFLClient:
    """Loads its slice of the global model, trains it, returns it.

    One sub-model per width is built once per client process (from the full
    model), with the reference's scaler and label-split mask as hooks
    (``strategy.scaler``, ``strategy.mask``), and reused; each message loads
    the received slice into it and sets the mask to the client's classes.

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
        self.options = experiment.strategy.options
        self._models: dict[float, tuple[nn.Module, WidthHooks]] = {}

    def width(self, partition_id: int) -> float:
        """The client's width ratio."""
        return capacity_of(self.experiment.strategy.options.capacities, partition_id)

    def model_for(self, partition_id: int) -> tuple[nn.Module, WidthHooks]:
        """The (cached) sub-model at the client's width and its hooks."""
        ratio = self.width(partition_id)
        if ratio not in self._models:
            model = sub_model(self.full, ratio).to(self.device)
            hooks = WidthHooks(
                model, ratio, scaler=self.options.scaler, mask=self.options.mask
            )
            self._models[ratio] = (model, hooks)
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

    def load(self, content: RecordDict, data: ClientData) -> nn.Module:
        """The received slice, masked to the client's classes (train split)."""
        model, hooks = self.model_for(data.partition_id)
        model.load_state_dict(content.array_records[ARRAYS].to_torch_state_dict())
        hooks.labels = label_split(data.train.y) if self.options.mask else None
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
        model = self.load(content, data)
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
        reply = RecordDict({ARRAYS: ArrayRecord(local), METRICS: MetricRecord(metrics)})
        if self.options.mask:
            reply[LABEL_SPLIT] = ConfigRecord({LABEL_SPLIT: label_split(data.train.y)})
        return reply

    def evaluate(
        self,
        content: RecordDict,
        data: ClientData,
        *,
        server_round: int,
        state: RecordDict,
    ) -> RecordDict:
        """Clean (and, with ``robust.epsilon`` > 0, PGD) loss and accuracy of the
        client's slice of the global model (masked to its classes with
        ``strategy.mask``, as the reference's local evaluation) on its local
        test split."""
        return evaluation_reply(
            self.load(content, data),
            data,
            self.experiment,
            server_round=server_round,
            device=self.device,
            width=self.width(data.partition_id),
        )
