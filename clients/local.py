"""Local-only training: the client side of the ``local`` baseline (see
:mod:`strategies.local`)."""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from fedsim import privacy
from fedsim.core.experiment import Experiment
from fedsim.core.messages import METRICS, NUM_EXAMPLES
from fedsim.core.seeding import derive_seed
from fedsim.learn.base import build_model
from fedsim.learn.data import ClientData, DatasetInfo
from fedsim.learn.training import evaluate, evaluation_metrics, local_fit, num_examples

#: ``context.state`` key of the client's own model.
MODEL = "local.model"


class LocalClient:
    """Trains its own model, kept in ``context.state``; shares nothing.

    Message contract (see :mod:`strategies.local`): ignores the (empty)
    ``arrays``; ``train`` replies ``metrics`` with ``loss`` and
    ``num-examples``; ``evaluate`` replies ``loss``, ``accuracy``,
    ``num-examples``.
    """

    def __init__(self, experiment: Experiment, info: DatasetInfo, device: torch.device):
        self.experiment = experiment
        self.device = device
        self.model = build_model(experiment.model, info, experiment.seed).to(device)
        self.initial = {
            k: v.detach().clone() for k, v in self.model.state_dict().items()
        }

    def load(self, state: RecordDict) -> None:
        """This client's model, or the run's initial model before its first
        round."""
        if MODEL in state:
            weights = state[MODEL].to_torch_state_dict()  # type: ignore[union-attr]
        else:
            weights = self.initial
        self.model.load_state_dict(weights)

    def train(
        self,
        content: RecordDict,
        data: ClientData,
        *,
        server_round: int,
        state: RecordDict,
    ) -> RecordDict:
        """One round of local training; the model goes back to ``state``."""
        exp = self.experiment
        self.load(state)
        stats, extra = local_fit(
            self.model,
            data.train,
            exp,
            seed=derive_seed(exp.seed, "train", server_round, data.partition_id),
            device=self.device,
            state=state,
            mechanism=privacy.client_mechanism(exp),
        )
        state[MODEL] = ArrayRecord(
            {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        )
        metrics: dict[str, Any] = {
            "loss": stats.loss,
            NUM_EXAMPLES: num_examples(stats, data.train),
            **extra,
        }
        return RecordDict({METRICS: MetricRecord(metrics)})

    def evaluate(
        self,
        content: RecordDict,
        data: ClientData,
        *,
        server_round: int,
        state: RecordDict,
    ) -> RecordDict:
        """This client's own model on its local test split."""
        self.load(state)
        stats = evaluate(self.model, data.test, device=self.device)
        return RecordDict({METRICS: evaluation_metrics(stats)})
