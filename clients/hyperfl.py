"""HyperFL's client side: private embedding and head, shared hypernetwork.

See :mod:`fedsim.strategies.hyperfl` for the paper, the deviations from the reference
code and the message contract.
"""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from torch import nn

from fedsim import privacy
from fedsim.clients.full import evaluation_reply
from fedsim.core.experiment import Experiment
from fedsim.core.messages import ARRAYS, METRICS, NUM_EXAMPLES
from fedsim.core.seeding import derive_seed
from fedsim.learn.base import build_model
from fedsim.learn.data import ClientData, DatasetInfo
from fedsim.learn.hypernet import (
    HEAD,
    GroupClippedSGD,
    HyperModel,
    HyperNetwork,
    extractor_shapes,
    initial_hypernetwork,
    is_shared,
    lora_shapes,
)
from fedsim.learn.lora import inject_lora, lora_layout
from fedsim.learn.training import (
    make_loader,
    num_examples,
)

#: ``context.state`` key of a client's private arrays (embedding and head).
PRIVATE = "hyperfl.private"
#: Name of the embedding in the private record.
EMBEDDING = "embedding"
#: Prefix of the hypernetwork's private tensors in the private record
#: (``strategy.share = "trunk"``: its output heads).
HYPERNETWORK = "hypernetwork."


class HyperFLClient:
    """Trains the private head, then the hypernetwork and the private embedding;
    replies with the hypernetwork only.

    The target model and the hypernetwork are built once per client process;
    each message loads the received hypernetwork and this client's private
    embedding and head from its ``context.state`` (a seeded initialisation the
    first time), and training stores them back there.

    Message contract (see :mod:`fedsim.strategies.hyperfl`): receives ``arrays`` (the
    hypernetwork); ``train`` replies ``arrays`` (the hypernetwork after local
    training) and ``metrics`` with ``loss``, ``head-loss``, ``num-examples``;
    ``evaluate`` replies ``metrics`` with ``loss``, ``accuracy``,
    ``num-examples``.

    Parameters
    ----------
    experiment : Experiment
        The run's configuration (the family's keys in
        ``experiment.strategy.options``).
    info : DatasetInfo
        Input shape and classes, to build the target model.
    device : torch.device
        Where the models live and train.
    """

    def __init__(self, experiment: Experiment, info: DatasetInfo, device: torch.device):
        self.experiment = experiment
        self.options = experiment.strategy.options
        self.device = device
        target, shapes = self.build_target(info)
        self.shapes = shapes
        hypernetwork = HyperNetwork(
            shapes,
            embedding_dim=self.options.embedding_dim,
            hidden_dim=self.options.hidden_dim,
            head_bias=self.options.head_bias,
        )
        self.model = HyperModel(target, hypernetwork).to(device)

    def build_target(
        self, info: DatasetInfo
    ) -> tuple[nn.Module, dict[str, torch.Size]]:
        """The target model and the shapes of the tensors generated for it: the
        feature extractor (every parameter outside ``head``)."""
        target = build_model(self.experiment.model, info, self.experiment.seed)
        return target, extractor_shapes(target)

    # -- private state -----------------------------------------------------------
    def private_arrays(self) -> dict[str, torch.Tensor]:
        """The client's private embedding and head, and the hypernetwork's
        private tensors (``strategy.share = "trunk"``: its output heads) under
        :data:`HYPERNETWORK` (CPU copies)."""
        out = {EMBEDDING: self.model.embedding.detach().cpu().clone()}
        for name, p in self.model.target.named_parameters():
            if name.startswith(f"{HEAD}."):
                out[name] = p.detach().cpu().clone()
        for name, value in self.model.hypernetwork.state_dict().items():
            if not is_shared(name, self.options.share):
                out[HYPERNETWORK + name] = value.detach().cpu().clone()
        return out

    def initial_private(self, partition_id: int) -> dict[str, torch.Tensor]:
        """A client's first embedding (N(0, 1)) and head (``nn.Linear``'s init),
        drawn on the CPU from a seed of the run seed and the partition id."""
        head = self.model.target.get_submodule(HEAD)
        assert isinstance(head, nn.Linear)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(
                derive_seed(self.experiment.seed, "hyperfl-private", partition_id)
            )
            embedding = torch.randn(self.model.embedding.shape)
            fresh = nn.Linear(head.in_features, head.out_features)
        first = {
            EMBEDDING: embedding,
            f"{HEAD}.weight": fresh.weight.detach(),
            f"{HEAD}.bias": fresh.bias.detach(),
        }
        if self.options.share != "all":  # private heads start as the server's
            net = initial_hypernetwork(self.shapes, self.options, self.experiment.seed)
            for name, value in net.state_dict().items():
                if not is_shared(name, self.options.share):
                    first[HYPERNETWORK + name] = value
        return first

    def load(self, content: RecordDict, state: RecordDict, partition_id: int) -> None:
        """Load the received hypernetwork and this client's private arrays."""
        received = content[ARRAYS].to_torch_state_dict()  # type: ignore[union-attr]
        if PRIVATE in state:
            private = state[PRIVATE].to_torch_state_dict()  # type: ignore[union-attr]
        else:
            private = self.initial_private(partition_id)
        mine = {
            k[len(HYPERNETWORK) :]: private.pop(k)
            for k in list(private)
            if k.startswith(HYPERNETWORK)
        }
        self.model.hypernetwork.load_state_dict({**received, **mine})
        params = dict(self.model.target.named_parameters())
        with torch.no_grad():
            self.model.embedding.copy_(private.pop(EMBEDDING))
            for name, value in private.items():
                params[name].copy_(value)

    # -- messages ----------------------------------------------------------------
    def train(
        self,
        content: RecordDict,
        data: ClientData,
        *,
        server_round: int,
        state: RecordDict,
    ) -> RecordDict:
        """The head phase, then the hypernetwork-and-embedding phase."""
        exp, opts, model = self.experiment, self.options, self.model
        self.load(content, state, data.partition_id)
        mechanism = privacy.client_mechanism(exp)
        seed = derive_seed(exp.seed, "train", server_round, data.partition_id)
        torch.manual_seed(seed)
        loader = make_loader(data.train, exp.train.batch_size, seed=seed)

        head = model.head_parameters()
        model.train_only(head)
        optimizer = torch.optim.SGD(
            head,
            lr=opts.head_lr,
            momentum=opts.head_momentum,
            weight_decay=opts.weight_decay,
        )
        head_stats, _ = mechanism.fit(
            model,
            optimizer,
            loader,
            epochs=opts.head_epochs,
            device=self.device,
            state=state,
        )

        hyper = list(model.hypernetwork.parameters())
        model.train_only([*hyper, model.embedding])
        optimizer = GroupClippedSGD(
            [hyper, [model.embedding]],
            max_grad_norm=opts.max_grad_norm,
            lr=opts.hyper_lr,
            momentum=opts.hyper_momentum,
            weight_decay=opts.weight_decay,
        )
        stats, extra = mechanism.fit(
            model,
            optimizer,
            loader,
            epochs=exp.train.epochs,
            device=self.device,
            state=state,
        )
        model.train_only([])
        state[PRIVATE] = ArrayRecord(self.private_arrays())
        shared = {
            k: v.detach().cpu()
            for k, v in model.hypernetwork.state_dict().items()
            if is_shared(k, opts.share)
        }
        metrics: dict[str, Any] = {
            "loss": stats.loss,
            "head-loss": head_stats.loss,
            NUM_EXAMPLES: num_examples(stats, data.train),
            **extra,
        }
        return RecordDict({ARRAYS: ArrayRecord(shared), METRICS: MetricRecord(metrics)})

    def evaluate(
        self,
        content: RecordDict,
        data: ClientData,
        *,
        server_round: int,
        state: RecordDict,
    ) -> RecordDict:
        """Personalised evaluation: the extractor generated by the received
        hypernetwork from this client's embedding, with its private head, on its
        local test split (and its PGD accuracy with ``robust.epsilon`` > 0)."""
        self.load(content, state, data.partition_id)
        return evaluation_reply(
            self.model,
            data,
            self.experiment,
            server_round=server_round,
            device=self.device,
        )


class LpmClient(HyperFLClient):
    """HyperFL-LPM: the frozen pre-trained base carries LoRA adapters (PEFT) on
    ``peft.targets``; the hypernetwork generates their factors (rank
    ``peft.rank``); the head is private. Same phases and contract as
    :class:`HyperFLClient`."""

    def build_target(
        self, info: DatasetInfo
    ) -> tuple[nn.Module, dict[str, torch.Size]]:
        exp = self.experiment
        base = build_model(exp.model, info, exp.seed)
        base.requires_grad_(False)
        shapes = lora_shapes(base, exp.peft)
        # The injected factors' own values are never used: every forward pass
        # replaces them with generated ones.
        inject_lora(
            base, exp.peft, lora_layout(base, exp.peft), rank=exp.peft.rank, init_seed=0
        )
        return base, shapes
