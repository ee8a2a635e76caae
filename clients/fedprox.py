"""FedProx's client: FedAvg's full-model training plus the proximal term
``mu/2 ||w - w_global||^2`` (see :mod:`fedsim.strategies.fedprox`)."""

from __future__ import annotations

import torch
from flwr.app import RecordDict

from fedsim.clients.full import FullModelClient
from fedsim.learn.training import Penalty


def proximal_term(params: list[torch.nn.Parameter], mu: float) -> Penalty:
    """``penalty()`` = ``mu/2 * sum ||p - p_0||^2`` over ``params``, ``p_0``
    their values now (the received global model)."""
    anchors = [p.detach().clone() for p in params]

    def penalty() -> torch.Tensor:
        total = sum(((p - a) ** 2).sum() for p, a in zip(params, anchors, strict=True))
        return mu / 2 * total  # type: ignore[return-value]

    return penalty


class FedProxClient(FullModelClient):
    """Loads the global model, trains every parameter on the local loss plus
    the proximal term around it, returns the whole model (FedAvg's contract)."""

    def penalty(self, content: RecordDict, state: RecordDict) -> Penalty:
        """``mu/2 ||w - w_global||^2`` around the model just received."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        return proximal_term(params, self.experiment.strategy.options.proximal_mu)
