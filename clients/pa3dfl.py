"""Pa3dFL's client side: trains its width's decomposed layers (general ``u``,
personal ``v``); the biases are private.

See :mod:`fedsim.strategies.pa3dfl` for the paper, the choices and the message
contract.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from fedsim.clients.full import evaluation_reply, fit_round, train_metrics
from fedsim.core.capacity import capacity_of
from fedsim.core.experiment import Experiment
from fedsim.core.messages import ARRAYS, METRICS
from fedsim.learn.base import build_model
from fedsim.learn.capacity import training_memory_bytes
from fedsim.learn.data import ClientData, DatasetInfo
from fedsim.learn.decomposed import DecomposedModel, factors_of

#: ``context.state`` key of a client's private biases.
PRIVATE = "pa3dfl.private"
#: Bytes in a megabyte.
MB = 1e6


class Pa3dFLClient:
    """Loads the general parameters and its personal ones, trains them with its
    private biases, returns the factors and keeps the biases.

    Parameters
    ----------
    experiment : Experiment
        The run's configuration (``strategy.capacities``).
    info : DatasetInfo
        Input shape and classes.
    device : torch.device
        Where the model trains.
    """

    def __init__(self, experiment: Experiment, info: DatasetInfo, device: torch.device):
        self.experiment = experiment
        self.options = experiment.strategy.options
        self.info = info
        self.device = device
        self.full = build_model(experiment.model, info, experiment.seed)
        self.factors = factors_of(self.full, self.options.capacities)
        self._models: dict[float, tuple[DecomposedModel, dict[str, torch.Tensor]]] = {}

    def width(self, partition_id: int) -> float:
        return capacity_of(self.options.capacities, partition_id)

    def model_for(self, partition_id: int) -> tuple[DecomposedModel, dict]:
        """The (cached) decomposed model at the client's width and its initial
        biases (the run's initial model's, sliced)."""
        ratio = self.width(partition_id)
        if ratio not in self._models:
            model = DecomposedModel(self.full, ratio, self.factors)
            self._models[ratio] = (model.to(self.device), model.biases())
        return self._models[ratio]

    def load(self, content: RecordDict, state: RecordDict, pid: int) -> DecomposedModel:
        """The received factors and this client's private biases."""
        model, initial = self.model_for(pid)
        model.load_factors(content.array_records[ARRAYS].to_torch_state_dict())
        if PRIVATE in state:
            model.load_biases(state.array_records[PRIVATE].to_torch_state_dict())
        else:
            model.load_biases(initial)
        return model

    def train(
        self,
        content: RecordDict,
        data: ClientData,
        *,
        server_round: int,
        state: RecordDict,
    ) -> RecordDict:
        """Local training of ``u``, ``v`` and the private biases."""
        exp = self.experiment
        model = self.load(content, state, data.partition_id)
        stats, extra = fit_round(
            model,
            data,
            exp,
            server_round=server_round,
            device=self.device,
            state=state,
        )
        state[PRIVATE] = ArrayRecord(model.biases())
        factors = {k: v.detach().cpu() for k, v in model.factors().items()}
        trainable = [p for p in model.parameters() if p.requires_grad]
        memory = training_memory_bytes(
            model,
            self.info.input_shape,
            exp.train.batch_size,
            optimizer_slots=int(exp.train.momentum > 0),
        )
        metrics = train_metrics(
            stats,
            data,
            extra,
            width=self.width(data.partition_id),
            params=float(sum(p.numel() for p in trainable)),
            **{"memory-mb": memory / MB},
        )
        return RecordDict(
            {ARRAYS: ArrayRecord(factors), METRICS: MetricRecord(metrics)}
        )

    def evaluate(
        self,
        content: RecordDict,
        data: ClientData,
        *,
        server_round: int,
        state: RecordDict,
    ) -> RecordDict:
        """Personalised clean (and PGD) accuracy on the local test split."""
        return evaluation_reply(
            self.load(content, state, data.partition_id),
            data,
            self.experiment,
            server_round=server_round,
            device=self.device,
            width=self.width(data.partition_id),
        )
