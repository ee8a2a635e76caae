"""Pa3dFL's server: general parameters averaged, personal parameters generated
per client from attention-aggregated embeddings (see :mod:`fedsim.strategies.pa3dfl`).

The family has no global model: :meth:`Pa3dFL.run_round` runs FedAvg's round
shape with empty arrays, and :meth:`Pa3dFL.configure_train` /
:meth:`Pa3dFL.configure_evaluate` give each sampled node its own content.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from torch import nn

from fedsim.core.messages import ARRAYS, CONFIG
from fedsim.core.seeding import derive_seed
from fedsim.flwr_private import valid_replies
from fedsim.learn.capacity import Plan, block, chain
from fedsim.learn.decomposed import (
    GENERAL,
    PERSONAL,
    Factors,
    factors_of,
    personal_plan,
    scaled_general_for,
)
from fedsim.learn.hypernet import HyperNetwork
from fedsim.protocol.rounds import WithoutGlobalModel, per_node
from fedsim.protocol.setup import ServerSetup, with_message_keys
from fedsim.strategies.heterofl.server import plans
from fedsim.strategies.pa3dfl.maths import attention_aggregate, plain_mean


class Generator(nn.Module):
    """Client embeddings -> encoder -> self-attention per layer -> one decoder
    per layer -> the full-width personal parameters ``<layer>.v``, per client.

    Parameters
    ----------
    clients : int
        Number of clients (one embedding each, N(0, 1) initialised).
    shapes : mapping of str to shape
        Full-width shape of each layer's ``v`` (keys: the ``<layer>.v`` names).
    embedding_dim, hidden_dim : int
        Embedding size; hidden width of each decoder.
    """

    def __init__(
        self,
        clients: int,
        shapes: dict[str, torch.Size],
        *,
        embedding_dim: int,
        hidden_dim: int,
    ):
        super().__init__()
        d = embedding_dim
        self.embeddings = nn.Parameter(torch.randn(clients, d))
        self.encoder = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))
        #: ``log tau_l`` of each layer, ``tau`` starting at ``sqrt(d)``.
        self.log_temperatures = nn.Parameter(
            torch.full((len(shapes),), math.log(d) / 2)
        )
        self.decoders = nn.ModuleList(
            HyperNetwork({name: shape}, embedding_dim=d, hidden_dim=hidden_dim)
            for name, shape in shapes.items()
        )

    def aggregated(self) -> torch.Tensor:
        """``(layers, clients, d)``: every client's embedding of every layer."""
        encoded = self.encoder(self.embeddings)
        return attention_aggregate(encoded, self.log_temperatures.exp())

    def personal(self, partitions: Iterable[int]) -> dict[int, dict[str, torch.Tensor]]:
        """Full-width personal parameters of the given clients."""
        mixed = self.aggregated()
        out: dict[int, dict[str, torch.Tensor]] = {}
        for pid in partitions:
            out[pid] = {}
            for layer, decoder in enumerate(self.decoders):
                out[pid].update(decoder(mixed[layer, pid]))
        return out


def sliced(factors: dict[str, torch.Tensor], plan: Plan) -> dict[str, torch.Tensor]:
    """The leading blocks of full-width factors a width keeps."""
    return {k: factors[k][block(s)] for k, s in plan.items()}


class Pa3dFL(WithoutGlobalModel, FedAvg):
    """FedAvg's sampling and round shape with per-client generated content; no
    global model.

    Parameters
    ----------
    generator : Generator
        Embeddings, attention and hypernetwork.
    general : dict of str to ndarray
        The initial general parameters ``<layer>.u``.
    plan_of : callable
        Partition id -> the leading block of each ``<layer>.v`` it holds.
    hyper_lr, hyper_momentum : float
        The generator's SGD settings.
    **kwargs
        Flower ``FedAvg`` options.
    """

    def __init__(
        self,
        generator: Generator,
        general: dict[str, np.ndarray],
        plan_of: Callable[[int], Plan],
        *,
        hyper_lr: float,
        hyper_momentum: float,
        **kwargs: Any,
    ):
        super().__init__(**with_message_keys(kwargs))
        self.generator = generator
        self.general = general
        self.plan_of = plan_of
        self.optimizer = torch.optim.SGD(
            generator.parameters(), lr=hyper_lr, momentum=hyper_momentum
        )
        #: Node id -> partition id of the nodes sent content this round.
        self.sent_to: dict[int, int] = {}

    def content_for(self, partition_id: int) -> dict[str, torch.Tensor]:
        """The general parameters and the client's generated personal ones."""
        with torch.no_grad():
            full = self.generator.personal([partition_id])[partition_id]
        own = sliced(full, self.plan_of(partition_id))
        out = {k: torch.from_numpy(np.array(v)) for k, v in self.general.items()}
        out.update({k: v.detach().clone() for k, v in own.items()})
        return out

    def _own(self, messages: Iterable[Message], grid: Grid) -> list[Message]:
        def content(msg: Message, partition_id: int) -> RecordDict:
            self.sent_to[msg.metadata.dst_node_id] = partition_id
            config = ConfigRecord(dict(msg.content[CONFIG]))  # type: ignore[arg-type]
            arrays = ArrayRecord(self.content_for(partition_id))
            return RecordDict({ARRAYS: arrays, CONFIG: config})

        return per_node(messages, grid, content)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.sent_to = {}
        return self._own(
            super().configure_train(server_round, arrays, config, grid), grid
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self._own(
            super().configure_evaluate(server_round, arrays, config, grid), grid
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Plain mean of the general parameters (Eq. 6); one pFedHN step of
        the generator."""
        valid = valid_replies(self, replies, validate=False)
        if not valid:
            return None, None
        uploads = {
            self.sent_to[m.metadata.src_node_id]: {
                k: v.numpy()
                for k, v in m.content[ARRAYS].items()  # type: ignore[union-attr]
            }
            for m in valid
        }
        self.general = plain_mean(
            [{k: up[k] for k in self.general} for up in uploads.values()]
        )
        self.step_generator(uploads)
        contents = [msg.content for msg in valid]
        return None, self.train_metrics_aggr_fn(contents, self.weighted_by_key)

    def step_generator(self, uploads: dict[int, dict[str, np.ndarray]]) -> None:
        """Move every client's generated ``v`` toward its trained one:
        gradient ``sum_i J_i^T (sent_i - returned_i)`` over the round's clients
        (pFedHN's per-client step, taken for all of them at once)."""
        self.optimizer.zero_grad(set_to_none=True)
        generated = self.generator.personal(uploads)
        surrogate = torch.zeros(())
        for pid, up in uploads.items():
            own = sliced(generated[pid], self.plan_of(pid))
            for name, value in own.items():
                delta = value.detach() - torch.from_numpy(np.array(up[name]))
                surrogate = surrogate + (value * delta).sum()
        surrogate.backward()
        self.optimizer.step()

    # -- resume ------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Any]:
        """The general parameters, the generator (embeddings, encoder,
        temperatures, decoders) and its optimiser's momentum."""
        params = list(self.generator.parameters())
        momentum = [
            self.optimizer.state.get(p, {}).get("momentum_buffer") for p in params
        ]
        return {
            "general": {k: np.array(v) for k, v in self.general.items()},
            "generator": {
                k: v.detach().cpu().numpy().copy()
                for k, v in self.generator.state_dict().items()
            },
            "momentum": [
                None if m is None else m.detach().cpu().numpy().copy() for m in momentum
            ],
        }

    def restore_state(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`checkpoint_state`."""
        self.general = {k: np.asarray(v) for k, v in state["general"].items()}
        self.generator.load_state_dict(
            {k: torch.from_numpy(np.array(v)) for k, v in state["generator"].items()}
        )
        self.optimizer.state.clear()
        params = list(self.generator.parameters())
        for param, buf in zip(params, state["momentum"], strict=True):
            if buf is not None:
                self.optimizer.state[param] = {
                    "momentum_buffer": torch.from_numpy(np.array(buf))
                }


def factor_plans(
    model: nn.Module, capacities: Sequence[float], factors: dict[str, Factors]
) -> Callable[[int], Plan]:
    """Partition id -> the leading block of every ``<layer>.v`` at its width."""
    width_of = plans(model, capacities)
    return lambda pid: personal_plan(width_of(pid), factors)


def initial_general(
    model: nn.Module, generator: Generator, factors: dict[str, Factors]
) -> dict[str, np.ndarray]:
    """Each layer's ``u`` whose composition with the mean generated full-width
    ``v`` is closest to the initial model's weight, rescaled to that weight's
    norm (:func:`scaled_general_for`)."""
    with torch.no_grad():
        generated = generator.personal(range(generator.embeddings.shape[0]))
        out = {}
        for name, layer in chain(model):
            key = f"{name}.{PERSONAL}"
            mean = torch.stack([g[key] for g in generated.values()]).mean(0)
            u = scaled_general_for(layer.weight.detach().cpu(), mean, factors[name].r1)
            out[f"{name}.{GENERAL}"] = u.numpy()
        return out


def build(setup: ServerSetup) -> Pa3dFL:
    """Pa3dFL over the experiment's model, ``strategy.capacities`` and keys."""
    opts, model = setup.options, setup.model
    factors = factors_of(model, opts.capacities)
    shapes = {
        f"{name}.{PERSONAL}": torch.Size(f.personal_shape)
        for name, f in factors.items()
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(setup.experiment.seed, "pa3dfl-generator"))
        generator = Generator(
            setup.experiment.federation.clients,
            shapes,
            embedding_dim=opts.embedding_dim,
            hidden_dim=opts.hidden_dim,
        )
    return Pa3dFL(
        generator,
        initial_general(model, generator, factors),
        factor_plans(model, opts.capacities, factors),
        hyper_lr=opts.hyper_lr,
        hyper_momentum=opts.hyper_momentum,
        **setup.fedavg_options(),
    )
