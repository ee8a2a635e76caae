"""Full-model local training: the client side of FedAvg; and the pieces of a
client round that the other client algorithms share (:func:`fit_round`,
:func:`train_metrics`, :func:`evaluation_reply`)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from torch import nn

from fedsim import privacy
from fedsim.core.experiment import Experiment
from fedsim.core.messages import ARRAYS, METRICS, NUM_EXAMPLES
from fedsim.core.seeding import derive_seed
from fedsim.learn.base import build_model
from fedsim.learn.data import ClientData, DatasetInfo
from fedsim.learn.robust import robust_metrics
from fedsim.learn.tasks import metric_record, task_for
from fedsim.learn.training import (
    LossFn,
    Penalty,
    TrainStats,
    local_fit,
    num_examples,
)


def fit_round(
    model: nn.Module,
    data: ClientData,
    exp: Experiment,
    *,
    server_round: int,
    device: torch.device,
    state: RecordDict,
    loss: LossFn | None = None,
    penalty: Penalty | None = None,
) -> tuple[TrainStats, dict[str, float]]:
    """One round of :func:`fedsim.learn.training.local_fit` on the client's train
    split, seeded by round and partition, through the experiment's privacy
    mechanism: the local training of every client algorithm that trains its
    model's trainable parameters.

    ``loss`` (``loss(model, x, y)``; by default the task's loss, e.g.
    cross-entropy for classification) is the batch's loss; ``penalty``
    (``penalty()``, of the trained parameters alone) is added to it (DP-SGD
    adds its gradient after privatising, see
    :data:`fedsim.learn.training.Penalty`). A family changes its local
    objective through these, e.g. FedProx's proximal term."""
    return local_fit(
        model,
        data.train,
        exp,
        seed=derive_seed(exp.seed, "train", server_round, data.partition_id),
        device=device,
        state=state,
        mechanism=privacy.client_mechanism(exp),
        loss=task_for(exp).loss if loss is None else loss,
        penalty=penalty,
    )


def train_metrics(
    stats: TrainStats, data: ClientData, extra: dict[str, float], **more: Any
) -> dict[str, Any]:
    """The metrics of a train reply: ``loss``, ``num-examples``, then ``more``
    (the algorithm's own keys), then ``extra`` (the privacy mechanism's)."""
    return {
        "loss": stats.loss,
        NUM_EXAMPLES: num_examples(stats, data.train),
        **more,
        **extra,
    }


def evaluation_reply(
    model: nn.Module,
    data: ClientData,
    exp: Experiment,
    *,
    server_round: int,
    device: torch.device,
    **more: Any,
) -> RecordDict:
    """The evaluate reply of ``model`` on the client's test split: clean loss and
    accuracy, with ``robust.epsilon`` > 0 the PGD ones (seeded by round and
    partition), then ``more`` (the algorithm's own keys)."""
    metrics = metric_record(task_for(exp).evaluate(model, data.test, device=device))
    seed = derive_seed(exp.seed, "pgd", server_round, data.partition_id)
    robust = robust_metrics(model, data.test, exp.robust, device=device, seed=seed)
    for key, value in {**robust, **more}.items():
        metrics[key] = value
    return RecordDict({METRICS: metrics})


class FullModelClient:
    """Loads the global model, trains every parameter, returns the whole model.

    Message contract (see :mod:`fedsim.strategies.fedavg`): receives ``arrays`` (global
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

    def penalty(self, content: RecordDict, state: RecordDict) -> Penalty | None:
        """The local objective's term besides the loss, built once the received
        model is loaded (none here; FedProx: its proximal term)."""
        return None

    def train(
        self,
        content: RecordDict,
        data: ClientData,
        *,
        server_round: int,
        state: RecordDict,
    ) -> RecordDict:
        """One round of local training from the received global model."""
        self.load(content, state)
        stats, extra = fit_round(
            self.model,
            data,
            self.experiment,
            server_round=server_round,
            device=self.device,
            state=state,
            penalty=self.penalty(content, state),
        )
        reply = self.keep(state)
        reply[METRICS] = MetricRecord(train_metrics(stats, data, extra))
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
        self.load(content, state)
        return evaluation_reply(
            self.model,
            data,
            self.experiment,
            server_round=server_round,
            device=self.device,
        )


class FineTunedEvaluationClient(FullModelClient):
    """FedAvg's client; with ``strategy.finetune-epochs`` E > 0 its evaluation is
    personalised: the received global model is first trained E epochs on the
    client's train split (the local loop, seeded by round and partition), then
    evaluated on its test split. The fine-tuned weights are not kept (the next
    message overwrites the resident model) and never travel.

    The client's model after local training in round t + 1 is the round-t
    global model trained ``train.epochs`` epochs on the same split, so
    ``finetune-epochs = train.epochs`` evaluates each client's locally trained
    model, the "FedAvg" row of personalised-FL papers such as HyperFL's.
    """

    def evaluate(
        self,
        content: RecordDict,
        data: ClientData,
        *,
        server_round: int,
        state: RecordDict,
    ) -> RecordDict:
        """Fine-tune the received global model E epochs, then evaluate it."""
        epochs = self.experiment.strategy.options.finetune_epochs
        if epochs == 0:
            return super().evaluate(
                content, data, server_round=server_round, state=state
            )
        self.load(content, state)
        exp = self.experiment
        tuned = replace(exp, train=replace(exp.train, epochs=epochs))
        local_fit(
            self.model,
            data.train,
            tuned,
            seed=derive_seed(exp.seed, "finetune", server_round, data.partition_id),
            device=self.device,
            state=RecordDict(),
            mechanism=privacy.client_mechanism(exp),
        )
        return evaluation_reply(
            self.model, data, exp, server_round=server_round, device=self.device
        )
