"""FedPer's client (see :mod:`fedsim.strategies.fedper`): trains the received
body with its own head, kept in ``context.state``."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, RecordDict

from fedsim.clients.full import FullModelClient
from fedsim.core.experiment import Experiment
from fedsim.core.messages import ARRAYS
from fedsim.learn.data import DatasetInfo
from fedsim.learn.hypernet import is_head

#: ``context.state`` key of the client's private head.
HEAD_STATE = "fedper.head"


class FedPerClient(FullModelClient):
    """FedAvg's client with the head kept private: the model a round starts
    from is the received body plus this client's head (the run's initial head
    before its first round); the trained head goes back to ``state``, the
    reply carries the body only. Evaluation uses the same body-plus-own-head.
    """

    def __init__(self, experiment: Experiment, info: DatasetInfo, device: torch.device):
        super().__init__(experiment, info, device)
        self.initial_head = {
            k: v.detach().clone()
            for k, v in self.model.state_dict().items()
            if is_head(k)
        }

    def load(self, content: RecordDict, state: RecordDict) -> None:
        """The received body and this client's head."""
        body = content.array_records[ARRAYS].to_torch_state_dict()
        if any(is_head(k) for k in body):
            raise KeyError("FedPer's body must not carry the private head")
        if HEAD_STATE in state:
            head = state[HEAD_STATE].to_torch_state_dict()  # type: ignore[union-attr]
        else:
            head = self.initial_head
        self.model.load_state_dict({**body, **head})

    def keep(self, state: RecordDict) -> RecordDict:
        """The head goes to ``state``; the reply carries the body."""
        weights = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        state[HEAD_STATE] = ArrayRecord(
            {k: v for k, v in weights.items() if is_head(k)}
        )
        body = {k: v for k, v in weights.items() if not is_head(k)}
        return RecordDict({ARRAYS: ArrayRecord(body)})
