"""Local-only training: the client side of the ``local`` baseline (see
:mod:`fedsim.strategies.local`)."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, RecordDict

from fedsim.clients.full import FullModelClient
from fedsim.core.experiment import Experiment
from fedsim.learn.data import DatasetInfo

#: ``context.state`` key of the client's own model.
MODEL = "local.model"


class LocalClient(FullModelClient):
    """Trains its own model, kept in ``context.state``; shares nothing.

    FedAvg's client with the one thing that differs: the model a round starts
    from is the client's own (the run's initial model before its first round),
    and it goes back to the client's state instead of into the reply.

    Message contract (see :mod:`fedsim.strategies.local`): ignores the (empty)
    ``arrays``; ``train`` replies ``metrics`` with ``loss`` and
    ``num-examples``; ``evaluate`` replies ``loss``, ``accuracy``,
    ``num-examples``.
    """

    def __init__(self, experiment: Experiment, info: DatasetInfo, device: torch.device):
        super().__init__(experiment, info, device)
        self.initial = {
            k: v.detach().clone() for k, v in self.model.state_dict().items()
        }

    def load(self, content: RecordDict, state: RecordDict) -> None:
        """This client's model, or the run's initial model before its first
        round."""
        if MODEL in state:
            weights = state[MODEL].to_torch_state_dict()  # type: ignore[union-attr]
        else:
            weights = self.initial
        self.model.load_state_dict(weights)

    def keep(self, state: RecordDict) -> RecordDict:
        """The trained model goes back to ``state``; the reply carries none."""
        state[MODEL] = ArrayRecord(
            {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        )
        return RecordDict()
