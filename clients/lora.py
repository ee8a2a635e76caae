"""LoRA fine-tuning on a frozen, resident base: the client side of FLoRA and FedIT."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from torch import nn

from fedsim.clients.full import fit_round, train_metrics
from fedsim.core.experiment import Experiment
from fedsim.core.messages import ARRAYS, LORA_RANK, LORA_SCALING, METRICS
from fedsim.core.seeding import derive_seed
from fedsim.learn.base import build_model
from fedsim.learn.data import ClientData, DatasetInfo
from fedsim.learn.hf import to_wire, wire_dtype
from fedsim.learn.lora import (
    adapter_state,
    inject_lora,
    lora_layout,
    rank_for,
    scaling_for,
)
from fedsim.learn.tasks import metric_record, task_for
from fedsim.learn.training import Penalty


class LoraClient:
    """Trains fresh LoRA adapters of the client's rank on the received model.

    The base model is built once per client process and stays resident (frozen)
    between rounds and across the partitions the process serves; a message only
    overwrites the weights that rounds change (adapted layers, modules trained in
    full). Each round the client wraps the base with fresh PEFT adapters (A drawn
    from a generator seeded by the run seed and the round, B = 0), trains them
    and the modules in ``peft.modules-to-save``, replies, and unwraps the base,
    restoring the weights it received.

    Message contract (see :mod:`fedsim.strategies.flora`): receives ``arrays`` (the
    changing part of the global model); replies ``arrays`` (adapters under
    ``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` and the fully trained
    parameters, in the model's wire dtype: :func:`fedsim.learn.hf.wire_dtype`,
    float16 for a float16 model, else float32) and ``metrics`` with ``loss``,
    ``num-examples``, ``lora-rank``, ``lora-scaling``.

    Parameters
    ----------
    experiment : Experiment
        The run's configuration (``peft.method`` = ``"lora"``).
    info : DatasetInfo
        Input shape and classes, to build the base.
    device : torch.device
        Where the base lives and trains.
    """

    def __init__(self, experiment: Experiment, info: DatasetInfo, device: torch.device):
        self.experiment = experiment
        self.device = device
        self.base = build_model(experiment.model, info, experiment.seed).to(device)
        self.base.requires_grad_(False)
        self.layout = lora_layout(self.base, experiment.peft)

    def load(self, content: RecordDict) -> None:
        """Overwrite the resident base's weights with the received ones."""
        received = content[ARRAYS].to_torch_state_dict()  # type: ignore[union-attr]
        result = self.base.load_state_dict(received, strict=False)
        if result.unexpected_keys:
            raise KeyError(
                f"received arrays the model lacks: {result.unexpected_keys[:3]}"
            )

    def penalty(
        self, model: nn.Module, content: RecordDict, state: RecordDict
    ) -> Penalty | None:
        """The local objective's term besides the loss, over the trainable
        parameters of ``model`` (the base wrapped with this round's adapters);
        none here. A family that changes the LoRA client's objective overrides
        this (see :data:`fedsim.learn.training.Penalty`)."""
        return None

    def init_seed(self, partition_id: int, server_round: int) -> int:
        """Seed of the fresh adapters' A: one per round, shared by its clients."""
        return derive_seed(self.experiment.seed, "lora-init", server_round)

    def start(self, content: RecordDict, rank: int) -> None:
        """Set the injected adapters' start from ``content`` before training;
        FLoRA's clients keep the fresh ones."""

    def train(
        self,
        content: RecordDict,
        data: ClientData,
        *,
        server_round: int,
        state: RecordDict,
    ) -> RecordDict:
        """One round of LoRA training from the received global model."""
        exp = self.experiment
        self.load(content)
        rank = rank_for(exp.peft, data.partition_id)
        params = dict(self.base.named_parameters())
        trained = {k: params[k] for k in self.layout.trained}
        received = {k: p.detach().clone() for k, p in trained.items()}
        model = inject_lora(
            self.base,
            exp.peft,
            self.layout,
            rank=rank,
            init_seed=self.init_seed(data.partition_id, server_round),
        )
        try:
            self.start(content, rank)
            for p in trained.values():
                p.requires_grad_(True)
            stats, extra = fit_round(
                model,
                data,
                exp,
                server_round=server_round,
                device=self.device,
                state=state,
                penalty=self.penalty(model, content, state),
            )
            arrays = adapter_state(self.base, self.layout)
            arrays.update({k: p.detach().cpu().clone() for k, p in trained.items()})
            arrays = to_wire(arrays, wire_dtype(exp.model))
        finally:
            model.unload()
            with torch.no_grad():
                for k, p in trained.items():
                    p.requires_grad_(False)
                    p.copy_(received[k])
        metrics = train_metrics(
            stats,
            data,
            extra,
            **{LORA_RANK: rank, LORA_SCALING: scaling_for(exp.peft, rank)},
        )
        return RecordDict({ARRAYS: ArrayRecord(arrays), METRICS: MetricRecord(metrics)})

    def evaluate(
        self,
        content: RecordDict,
        data: ClientData,
        *,
        server_round: int,
        state: RecordDict,
    ) -> RecordDict:
        """The task's metrics of the received global model on the local test split."""
        self.load(content)
        task = task_for(self.experiment)
        stats = task.evaluate(self.base, data.test, device=self.device)
        return RecordDict({METRICS: metric_record(stats)})
