"""HyperFL's server: Flower's ``FedAvg`` over the shared hypernetwork only (see
:mod:`fedsim.strategies.hyperfl` for the paper and the message contract).

The family has no global model: the round driver passes no arrays into
:meth:`HyperFL.run_round`, and the strategy keeps the hypernetwork itself
(:attr:`HyperFL.shared`), running FedAvg's round shape over it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg

from fedsim.core.messages import ARRAYS
from fedsim.learn.hypernet import (
    extractor_shapes,
    initial_hypernetwork,
    is_shared,
    lora_shapes,
)
from fedsim.protocol.rounds import SharedPart
from fedsim.protocol.setup import ServerSetup, with_message_keys


class HyperFL(SharedPart, FedAvg):
    """Example-weighted average of the clients' hypernetworks.

    Parameters
    ----------
    initial : ArrayRecord
        The hypernetwork round 1 starts from.
    **kwargs
        Flower ``FedAvg`` options (sampling fractions, minimum nodes...).
    """

    def __init__(self, initial: ArrayRecord, **kwargs: Any):
        super().__init__(**with_message_keys(kwargs))
        #: The current shared hypernetwork.
        self.shared = initial

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's weighted average, after checking that every reply carries
        exactly the hypernetwork's arrays."""
        replies = list(replies)
        expected = set(self.shared)
        for msg in replies:
            if msg.has_error():
                continue
            got = set(msg.content[ARRAYS]) if ARRAYS in msg.content else set()  # type: ignore[arg-type]
            if got != expected:
                extra = sorted(got - expected) or sorted(expected - got)
                raise ValueError(
                    f"node {msg.metadata.src_node_id} uploaded other arrays than the "
                    f"hypernetwork's (first difference: {extra[0]!r})"
                )
        return super().aggregate_train(server_round, replies)


def _strategy(setup: ServerSetup, shapes: dict[str, torch.Size]) -> HyperFL:
    net = initial_hypernetwork(shapes, setup.options, setup.experiment.seed)
    share = setup.options.share
    return HyperFL(
        ArrayRecord(
            {
                k: v.detach().cpu()
                for k, v in net.state_dict().items()
                if is_shared(k, share)
            }
        ),
        **setup.fedavg_options(),
    )


def build(setup: ServerSetup) -> HyperFL:
    """HyperFL: the hypernetwork generates the model's feature extractor."""
    return _strategy(setup, extractor_shapes(setup.model))


def build_lpm(setup: ServerSetup) -> HyperFL:
    """HyperFL-LPM: the hypernetwork generates LoRA factors of the frozen base."""
    return _strategy(setup, lora_shapes(setup.model, setup.experiment.peft))
