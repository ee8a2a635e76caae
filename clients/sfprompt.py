"""SFPrompt's client side (see :mod:`fedsim.strategies.split.sfprompt` for the
protocol and the message contract).

The client holds the frozen pre-trained head (embedding, prompts, first blocks)
and tail (last stages and the classifier) of the packaged ``vit``; it trains only
the soft prompts and the tail. Each round, on the ``train`` message: (1) EL2N
scores of every local training example with ``tail(head(x))`` (the server's body
skipped) under the received prompts and tail, and keeps the hardest
``split.keep-fraction``; (2) the local-loss update: ``split.local-epochs`` passes
of cross-entropy of ``tail(head(x))`` over the kept examples, prompts and tail
trained, no message; (3) U-shaped split training of the kept examples through
the server's frozen body (:class:`fedsim.clients.split.UshapeClient`'s exchanges). The
kept indices live in the round's cursor in ``context.state``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.app import RecordDict
from torch import nn

from fedsim.clients.split import UshapeClient
from fedsim.core.experiment import Experiment
from fedsim.core.messages import ARRAYS, METRICS, NUM_EXAMPLES
from fedsim.core.seeding import derive_seed
from fedsim.learn.data import Arrays, ClientData, DatasetInfo
from fedsim.learn.prompts import add_prompts, el2n_scores, hardest
from fedsim.learn.split import Segment, batch_plan
from fedsim.learn.training import make_loader, make_optimizer, train_epochs


class LocalPath(nn.Module):
    """``tail(head(x))``: the client's model with the server's body skipped."""

    def __init__(self, head: Segment, tail: Segment, model: nn.Module):
        super().__init__()
        self.head, self.tail = head, tail
        self.model = model  # registered, so train()/eval() reach the modules

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.head(x))


class SFPromptClient(UshapeClient):
    """SFPrompt: prompts and tail trained; head and body frozen.

    Parameters
    ----------
    experiment : Experiment
        ``[split]`` options: ``keep-fraction``, ``local-epochs``, ``prompts``.
    info : DatasetInfo
        Input shape and classes.
    device : torch.device
        Where the model lives and trains.
    """

    def __init__(self, experiment: Experiment, info: DatasetInfo, device: torch.device):
        super().__init__(experiment, info, device)
        add_prompts(self.model, self.options.prompts, experiment.seed)
        trained = set(self.trainable())
        for name, param in self.model.named_parameters():
            param.requires_grad_(name in trained)
        self.local = LocalPath(self.segments[0], self.segments[-1], self.model)

    def trainable(self) -> dict[str, nn.Parameter]:
        """The prompts and the tail's parameters, by state-dict name."""
        tail = self.segments[-1]
        return {
            n: p
            for n, p in self.model.named_parameters()
            if n == "prompts" or tail.owns(n)
        }

    def own_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self.trainable().items()}

    def load_own(self, arrays: dict[str, torch.Tensor]) -> None:
        params = self.trainable()
        if set(arrays) != set(params):
            raise ValueError(f"expected {sorted(params)}, got {sorted(arrays)}")
        with torch.no_grad():
            for name, value in arrays.items():
                params[name].copy_(torch.as_tensor(value))

    def optimizer(self) -> torch.optim.Optimizer:
        return make_optimizer(self.trainable().values(), self.experiment.train)

    # -- EL2N pruning and the local-loss update -------------------------------------
    @torch.no_grad()
    def scores(self, train: Arrays) -> np.ndarray:
        """EL2N of every example under the current prompts and tail."""
        self.model.eval()
        x = torch.from_numpy(train.x).to(self.device)
        y = torch.from_numpy(train.y).to(self.device)
        return el2n_scores(self.local(x), y)

    def local_update(self, kept: Arrays, server_round: int, partition: int) -> float:
        """``split.local-epochs`` passes over the kept examples; the mean loss."""
        exp = self.experiment
        seed = derive_seed(exp.seed, "sfprompt-local", server_round, partition)
        loader = make_loader(kept, exp.train.batch_size, seed=seed)
        optimizer = self.optimizer()
        stats = train_epochs(
            self.local,
            loader,
            optimizer,
            epochs=self.options.local_epochs,
            device=self.device,
        )
        return stats.loss

    # -- the round ------------------------------------------------------------------
    def plan(
        self, data: ClientData, server_round: int, cursor: dict[str, Any]
    ) -> list[np.ndarray]:
        """The split phase's batches: ``train.epochs`` shuffled passes over the
        kept examples (``cursor["kept"]``: their indices in the training set)."""
        exp = self.experiment
        seed = derive_seed(exp.seed, "train", server_round, data.partition_id)
        kept = np.asarray(cursor["kept"], dtype=np.int64)
        order = batch_plan(len(kept), exp.train.batch_size, exp.train.epochs, seed=seed)
        return [kept[batch] for batch in order]

    def train(
        self,
        content: RecordDict,
        data: ClientData,
        *,
        server_round: int,
        state: RecordDict,
    ) -> RecordDict:
        """Load prompts and tail, prune by EL2N, update locally, reply batch 0."""
        self.load_own(content.array_records[ARRAYS].to_torch_state_dict())
        kept = hardest(self.scores(data.train), self.options.keep_fraction)
        local_loss = self.local_update(
            data.train.subset(kept), server_round, data.partition_id
        )
        cursor = {
            "round": server_round,
            "batch": 0,
            "loss-sum": 0.0,
            "seen": 0,
            "kept": [int(i) for i in kept],
            "local-loss": local_loss,
        }
        return self.begin(data, server_round, state, cursor)

    def final(
        self, plan: list[np.ndarray], data: ClientData, cursor: dict[str, Any]
    ) -> RecordDict:
        """The prompts and tail, weighted by the examples kept this round."""
        reply = super().final(plan, data, cursor)
        metrics = reply[METRICS]
        metrics[NUM_EXAMPLES] = len(cursor["kept"])
        metrics["kept"] = len(cursor["kept"])
        metrics["local-loss"] = float(cursor["local-loss"])
        return reply
