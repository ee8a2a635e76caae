"""Hypernetworks that generate a model's weights from a client embedding.

HyperFL (Guo et al., "A New Federated Learning Framework Against Gradient
Inversion Attacks", AAAI 2025) does not train a client's feature extractor
directly: a hypernetwork maps a private client embedding ``e`` to every weight
of it. :class:`HyperNetwork` is the reference implementation's generator
(``cnn/models/cnn.py``, ``Hypernetwork_*``): ``e`` (``embedding_dim``) ->
``Linear(embedding_dim, hidden_dim)`` -> ReLU -> one ``Linear(hidden_dim,
numel)`` per generated tensor, reshaped to the tensor's shape.

:class:`HyperModel` composes it with the target model: its forward pass
generates the weights from the embedding and calls the target with them
(:func:`torch.func.functional_call`), the target's other parameters (the
private ``head``, a frozen base) taken from the module itself. So one autograd
graph runs from the loss through the generated weights into the hypernetwork
and the embedding; the reference gets the same gradients in two steps (the
loss's gradient with respect to the loaded weights, then a vector-Jacobian
product through the hypernetwork).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from fedsim.core.errors import ConfigError
from fedsim.core.experiment import PeftConfig
from fedsim.core.seeding import derive_seed
from fedsim.learn.lora import ADAPTER, LORA_A, LORA_B, lora_layout

#: Parameters of the module under this name are the private classifier head.
HEAD = "head"
#: The hypernetwork's shared trunk (embedding -> hidden features): what travels
#: when its output heads stay private (``strategy.share = "trunk"``).
TRUNK = "mlp"


def is_head(name: str) -> bool:
    """Whether a parameter name belongs to the ``head`` module."""
    return name == HEAD or name.startswith(f"{HEAD}.")


def extractor_shapes(model: nn.Module) -> dict[str, torch.Size]:
    """Name -> shape of every parameter of ``model`` outside its ``head``: the
    feature extractor HyperFL generates."""
    return {n: p.shape for n, p in model.named_parameters() if not is_head(n)}


def module_key(name: str) -> str:
    """The output head's key of a generated tensor (``ModuleDict`` keys cannot
    hold dots): ``heads.<module_key(name)>``."""
    return name.replace(".", "__")


class HyperNetwork(nn.Module):
    """Embedding -> hidden features -> one linear head per generated tensor.

    Parameters
    ----------
    shapes : mapping of str to shape
        The generated tensors (their names in the target model) and shapes.
    embedding_dim : int
        Size of the client embedding.
    hidden_dim : int
        Width of the shared hidden layer.
    head_bias : bool
        Whether the output heads have a bias (the reference's ``nn.Linear``
        default). Each head bias's update is the exact gradient of its generated
        tensor, which the server reads (the privacy audit's analytic attack);
        without it the head weight's update, ``dL/dt h^T``, still carries it.
    """

    def __init__(
        self,
        shapes: Mapping[str, Iterable[int]],
        *,
        embedding_dim: int,
        hidden_dim: int,
        head_bias: bool = True,
    ):
        super().__init__()
        self.shapes = {name: torch.Size(shape) for name, shape in shapes.items()}
        self.embedding_dim = embedding_dim
        if not self.shapes:
            raise ValueError("a hypernetwork needs at least one tensor to generate")
        self.mlp = nn.Sequential(nn.Linear(embedding_dim, hidden_dim), nn.ReLU())
        self.heads = nn.ModuleDict(
            {
                module_key(name): nn.Linear(hidden_dim, shape.numel(), bias=head_bias)
                for name, shape in self.shapes.items()
            }
        )

    def forward(self, embedding: torch.Tensor) -> dict[str, torch.Tensor]:
        """The generated tensors, by target name, for one embedding vector."""
        features = self.mlp(embedding)
        return {
            name: self.heads[module_key(name)](features).view(shape)
            for name, shape in self.shapes.items()
        }

    def numel(self) -> int:
        """Parameters of the hypernetwork (what travels each way per client)."""
        return sum(p.numel() for p in self.parameters())


def initial_hypernetwork(
    shapes: Mapping[str, Iterable[int]], options: Any, seed: int
) -> HyperNetwork:
    """The seeded round-1 hypernetwork (PyTorch's default ``nn.Linear`` init),
    the same in every process: the server's first model, and with private
    output heads each client's first heads."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "hypernetwork"))
        return HyperNetwork(
            shapes,
            embedding_dim=options.embedding_dim,
            hidden_dim=options.hidden_dim,
            head_bias=options.head_bias,
        )


def is_shared(name: str, share: str) -> bool:
    """Whether the hypernetwork tensor ``name`` travels: every one with
    ``share = "all"``, only the trunk's with ``"trunk"`` (output heads private)."""
    return share == "all" or name.startswith(f"{TRUNK}.")


class HyperModel(nn.Module):
    """The target model with its generated tensors taken from a hypernetwork.

    Parameters
    ----------
    target : nn.Module
        The model; its tensors named in ``hypernetwork.shapes`` are replaced by
        generated ones in every forward pass (their own values are unused).
    hypernetwork : HyperNetwork
        The shared generator; the private client embedding (``embedding``, a
        parameter of this module) has its ``embedding_dim``.
    """

    def __init__(self, target: nn.Module, hypernetwork: HyperNetwork):
        super().__init__()
        self.target = target
        self.hypernetwork = hypernetwork
        self.embedding = nn.Parameter(torch.zeros(hypernetwork.embedding_dim))
        params = dict(target.named_parameters())
        missing = [n for n in hypernetwork.shapes if n not in params]
        if missing:
            raise KeyError(f"the target model has no parameter {missing[0]!r}")
        for name in hypernetwork.shapes:
            params[name].requires_grad_(False)

    def generate(self) -> dict[str, torch.Tensor]:
        """The generated tensors for this client's embedding."""
        return self.hypernetwork(self.embedding)  # type: ignore[no-any-return]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.target, self.generate(), (x,), strict=False)  # type: ignore[no-any-return]

    def head_parameters(self) -> list[nn.Parameter]:
        """The private head's parameters."""
        return [p for n, p in self.target.named_parameters() if is_head(n)]

    def train_only(self, params: Iterable[nn.Parameter]) -> None:
        """Make ``params`` the only trainable parameters of this model's
        hypernetwork, embedding and head (the rest of the target stays frozen)."""
        chosen = {id(p) for p in params}
        for p in [*self.hypernetwork.parameters(), self.embedding]:
            p.requires_grad_(id(p) in chosen)
        for p in self.head_parameters():
            p.requires_grad_(id(p) in chosen)


class GroupClippedSGD(torch.optim.SGD):
    """SGD that clips each parameter group's gradient norm before its step.

    HyperFL clips the hypernetwork's and the embedding's gradients separately
    (each to norm 50 in the reference) and then steps with weight decay and
    momentum; keeping the clipping in the optimizer lets the one training loop
    (:func:`fedsim.learn.training.train_epochs`) run it unchanged.
    """

    def __init__(
        self,
        groups: Iterable[Iterable[nn.Parameter]],
        *,
        max_grad_norm: float,
        lr: float,
        momentum: float,
        weight_decay: float,
    ):
        super().__init__(
            [{"params": list(g)} for g in groups],
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
        )
        self.max_grad_norm = max_grad_norm

    def step(self, closure=None):  # type: ignore[no-untyped-def, override]
        for group in self.param_groups:
            nn.utils.clip_grad_norm_(group["params"], self.max_grad_norm)
        return super().step(closure)


def lora_shapes(model: nn.Module, peft: PeftConfig) -> dict[str, torch.Size]:
    """Name -> shape of the LoRA factors HyperFL-LPM generates: for every
    adapted module ``m`` (``peft.targets``), ``m.lora_A.default.weight`` (``r x
    d_in``) and ``m.lora_B.default.weight`` (``d_out x r``) with ``r =
    peft.rank``, PEFT's parameter names once :func:`fedsim.learn.lora.inject_lora`
    wrapped ``model``. ``d_in x d_out`` is read from the weight: ``nn.Linear``
    stores ``d_out x d_in``, GPT-2's ``Conv1D`` ``d_in x d_out``
    (``fan_in_fan_out``, :attr:`fedsim.learn.lora.LoraLayout.transposed`)."""
    layout = lora_layout(model, peft)
    shapes: dict[str, torch.Size] = {}
    for name in layout.adapted:
        weight = model.get_submodule(name).weight
        assert isinstance(weight, torch.Tensor) and weight.dim() == 2
        d_out, d_in = weight.shape
        if name in layout.transposed:
            d_in, d_out = d_out, d_in
        a, b = (f"{name}.{kind}.{ADAPTER}.weight" for kind in (LORA_A, LORA_B))
        shapes[a] = torch.Size((peft.rank, d_in))
        shapes[b] = torch.Size((d_out, peft.rank))
    return shapes


def check_lpm(experiment: Any, model: nn.Module, data: Any) -> None:
    """HyperFL-LPM's pre-run check: the LoRA targets resolve on the model, none
    is inside the private head, and every client has the same rank (one shared
    hypernetwork generates every client's factors)."""
    peft = experiment.peft
    if peft.ranks:
        raise ConfigError(
            "peft.ranks: one shared hypernetwork generates every client's LoRA "
            "factors, so all clients have peft.rank; leave peft.ranks empty"
        )
    inside = [m for m in lora_layout(model, peft).adapted if is_head(m)]
    if inside:
        raise ConfigError(
            f"peft.targets: {inside[0]!r} is the private head; HyperFL-LPM adapts "
            "the frozen base only"
        )
