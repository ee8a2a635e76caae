"""SFPrompt's server side: Cao, Zhu and Gong, "SFPrompt: Communication-Efficient
Split Federated Fine-Tuning for Large Pre-Trained Models over Resource-Limited
Devices" (arXiv 2407.17533, 2024).

The pre-trained packaged ``vit`` (``model.pretrain``) with ``split.prompts``
soft prompt tokens is cut into head (embedding, prompts, blocks up to
``split.cut``), body (the server's blocks) and tail (from ``split.tail``: the
final LayerNorm and the classifier by default); head and tail run on the client,
the body on the server. Only the prompts and the tail train; the head's and the
body's pre-trained weights stay frozen, so the server holds one body for every
client (nothing of it changes, nothing to average). A round:

1. ``train`` down: the global prompts and tail. The client scores its examples
   by EL2N through ``tail(head(x))`` (body skipped), keeps the hardest
   ``split.keep-fraction``, and updates prompts and tail on them with the local
   loss ``tail(head(x))`` (``split.local-epochs``; no message).
2. Split training of the kept examples, U-shaped (labels stay on the client):
   per batch, head activations up, body output down, the gradient of the body
   output up, the gradient of the head output down (the prompts' gradient flows
   through the frozen head).
3. The client's last reply carries its prompts and tail; the server averages
   them weighted by the examples each client kept (FedAvg).

Deviations from the paper: the packaged ViT is tiny (64 wide, 2 blocks) and
pre-trained centrally on public digits (:mod:`fedsim.learn.pretrain`), not an
ImageNet ViT-B; prompts are VPT-shallow (inserted once, before the first
block); the keep count is ``ceil(keep-fraction * n)``; the FedAvg weight is the
kept count.

Message contract: as :mod:`fedsim.strategies.split` (U-shaped), except that ``train``
down carries ``arrays`` = ``prompts`` and the tail's state-dict entries only,
and the client's last reply carries exactly those; its ``metrics`` add
``local-loss`` (mean loss of the local update) and ``kept`` (examples kept).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from fedsim.core.errors import ConfigError
from fedsim.core.experiment import Experiment
from fedsim.learn.models import ViT
from fedsim.learn.prompts import add_prompts
from fedsim.learn.split import Segment, cut_index, stage_names
from fedsim.protocol.setup import ServerSetup
from fedsim.strategies.split.server import (
    Session,
    UshapeSession,
    UshapeStrategy,
)
from fedsim.strategies.split.server import (
    check as split_check,
)


def prompted(model: nn.Module, experiment: Experiment) -> nn.Module:
    """The family's model (``Family.model``): the built, pre-trained ViT with
    ``split.prompts`` prompt tokens, seeded by the run (the same in every
    process)."""
    return add_prompts(model, experiment.strategy.options.prompts, experiment.seed)


def check(experiment: Experiment, model: nn.Module, data: Any) -> None:
    """Pre-run check: a ViT, cut into head, body and a tail that starts no later
    than ``pool`` (``tail(head(x))`` needs the tail to take the blocks' tokens)."""
    if not isinstance(model, ViT):
        raise ConfigError(
            f"model.name: sfprompt prompts the packaged 'vit', not "
            f"{type(model).__name__}"
        )
    split_check(experiment, model, data)
    options = experiment.strategy.options
    names = stage_names(model)
    if cut_index(model, options.tail, "split.tail") > names.index("pool"):
        raise ConfigError(
            f"split.tail: {options.tail!r} starts after 'pool'; SFPrompt's local "
            "loss runs tail(head(x)), so the tail must take the blocks' tokens "
            "(a block index or 'pool')"
        )


def trainable(model: nn.Module, tail: Segment) -> set[str]:
    """State-dict names of what SFPrompt trains: the prompts and the tail."""
    return {n for n, _ in model.named_parameters() if n == "prompts" or tail.owns(n)}


class SFPrompt(UshapeStrategy):
    """SFPrompt: U-shaped rounds over a frozen body; FedAvg of prompts + tail."""

    session_type = UshapeSession

    def __init__(self, setup: ServerSetup, **kwargs: Any):
        super().__init__(setup, **kwargs)
        self.trained = trainable(self.model, self.segments[-1])
        for name, param in self.model.named_parameters():
            param.requires_grad_(name in self.trained)

    def client_state(self) -> dict[str, torch.Tensor]:
        """What goes down in ``train``: the prompts and the tail."""
        state = self.model.state_dict()
        return {k: state[k].detach().cpu().clone() for k in sorted(self.trained)}

    def sessions(self, nodes: list[int], server_round: int) -> dict[int, Session]:
        """One frozen body for every client (a session each for its pending
        graph)."""
        return {
            node: self.session_type(self.server_of(self.segments), self.codec)
            for node in nodes
        }

    def server_state(self, sessions: Any, weights: Any) -> dict[str, np.ndarray]:
        """Everything but prompts and tail, unchanged (frozen)."""
        return {
            k: v.detach().cpu().numpy()
            for k, v in self.model.state_dict().items()
            if k not in self.trained
        }


def build(setup: ServerSetup) -> SFPrompt:
    """SFPrompt."""
    return SFPrompt(setup, **setup.fedavg_options())
