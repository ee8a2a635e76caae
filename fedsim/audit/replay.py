"""What an honest-but-curious server sees of one client's round, and how it
replays the client's local training on dummy data.

A family that can be audited names a *surface* in its declaration
(``Family.audit``, ``"module:callable"``): ``surface(sent, reply, public) ->
Scene``. ``sent`` and ``reply`` are the two messages' contents (what the server
sent the client and what came back), ``public`` the public hyper-parameters
(:class:`Public`: the experiment file and the data's shape, never the data).
The :class:`Scene` says which tensors the client trained from which start,
what update it uploaded (``observed``), the private values the attacker does
not know and has to optimise (``unknowns``), and the local optimiser; the
attack (:mod:`fedsim.audit.inverting`) replays local training with
:func:`simulate` and matches its update to ``observed``.

Surfaces here: :func:`full_model` (FedAvg, and DP-SGD-noised FedAvg: the
attacker replays plain SGD, the noise is unknown), :func:`lora_factors` (FLoRA,
FedIT: only the LoRA factors and the fully trained head); HyperFL's
(:func:`fedsim.audit.hypernetwork.hypernetwork`: only the hypernetwork; the
private embedding and head are unknowns) is in :mod:`fedsim.audit.hypernetwork`.
Split learning's surfaces, whose scenes hold activations instead of an update,
are in :mod:`fedsim.audit.activations`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import RecordDict
from torch import nn
from torch.func import functional_call

from fedsim.audit.linear import LinearTensors, input_linear, linear_layers
from fedsim.core.experiment import Experiment
from fedsim.core.messages import (
    ARRAYS,
    LORA_RANK,
    LORA_SCALING,
    METRICS,
    NUM_EXAMPLES,
)
from fedsim.core.seeding import derive_seed
from fedsim.learn.base import build_model
from fedsim.learn.data import DatasetInfo

Tensors = dict[str, torch.Tensor]
#: ``forward(params, unknowns, x) -> logits`` of the replayed client model.
Forward = Callable[[Tensors, Tensors, torch.Tensor], torch.Tensor]
#: Name of the output layer's bias (the label evidence), as every model names it.
HEAD_BIAS = "head.bias"


@dataclass(frozen=True)
class Public:
    """What the server knows besides the messages.

    Parameters
    ----------
    experiment : Experiment
        The experiment file: local lr, epochs, batch size, optimiser, model
        architecture, LoRA settings, the family's options, the run seed.
    info : DatasetInfo
        Input shape and number of classes (not the data).
    server_round : int
        The round the messages belong to.
    """

    experiment: Experiment
    info: DatasetInfo
    server_round: int


@dataclass(frozen=True)
class LocalOptimizer:
    """The client's local optimiser, replayed differentiably.

    ``kind`` ``sgd`` (PyTorch's SGD: weight decay added to the gradient, momentum
    buffer starting at the first gradient) or ``adam``. ``groups``: names whose
    gradient norm is clipped at ``max_grad_norm`` together, before the step
    (HyperFL's per-group clipping); empty: no clipping.
    """

    kind: str
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    groups: tuple[tuple[str, ...], ...] = ()
    max_grad_norm: float = math.inf
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


@dataclass
class Scene:
    """One client's round as the attacker sees it.

    Attributes
    ----------
    start : callable
        ``start(unknowns) -> tensors``: the trained tensors at the start of local
        training (known ones from the sent message, private ones from
        ``unknowns``).
    forward : callable
        ``forward(params, unknowns, x) -> logits``.
    observed : dict of str to Tensor
        The uploaded update (reply minus start) of the tensors it names.
    unknowns : dict of str to Tensor
        The attacker's first guesses of the private values it optimises.
    optimizer : LocalOptimizer
    epochs, batch_size, examples : int
        Local epochs, batch size and the number of examples the client trained
        on (``num-examples`` of the reply).
    bias : numpy.ndarray or None
        The observed update of the output bias, when the upload carries it.
    linear : dict of str to LinearTensors
        The model's linear layers (with bias) whose gradients the upload
        carries, and where (the analytic attacks, :mod:`fedsim.audit.analytic`).
    input_layer : str or None
        The linear layer that takes the raw input (:func:`input_linear`).
    """

    start: Callable[[Tensors], Tensors]
    forward: Forward
    observed: Tensors
    optimizer: LocalOptimizer
    epochs: int
    batch_size: int
    examples: int
    unknowns: Tensors = field(default_factory=dict)
    bias: np.ndarray | None = None
    linear: dict[str, LinearTensors] = field(default_factory=dict)
    input_layer: str | None = None


def _arrays(content: RecordDict) -> Tensors:
    return {
        k: v.detach().float()
        for k, v in content[ARRAYS].to_torch_state_dict().items()  # type: ignore[union-attr]
    }


def _examples(reply: RecordDict) -> int:
    return int(reply.metric_records[METRICS][NUM_EXAMPLES])  # type: ignore[arg-type]


def _local_training(
    start: Callable[[Tensors], Tensors],
    forward: Forward,
    observed: Tensors,
    public: Public,
    reply: RecordDict,
    model: nn.Module,
) -> Scene:
    """A scene whose client ran the experiment's own local training: ``[train]``'s
    optimizer, epochs and batch size; the linear layers of ``model`` whose
    weight and bias are both uploaded, trained in full."""
    t = public.experiment.train
    linear = {
        name: LinearTensors(f"{name}.weight", f"{name}.bias", shape)
        for name, shape in linear_layers(model).items()
        if f"{name}.weight" in observed and f"{name}.bias" in observed
    }
    return Scene(
        start=start,
        forward=forward,
        observed=observed,
        optimizer=LocalOptimizer(t.optimizer, t.lr, t.momentum, t.weight_decay),
        epochs=t.epochs,
        batch_size=t.batch_size,
        examples=_examples(reply),
        bias=_bias(observed),
        linear=linear,
        input_layer=input_linear(model, public.info.input_shape),
    )


def _target(public: Public) -> nn.Module:
    exp = public.experiment
    model = build_model(exp.model, public.info, exp.seed)
    model.requires_grad_(False)
    return model.train()


def _bias(observed: Tensors) -> np.ndarray | None:
    return observed[HEAD_BIAS].numpy() if HEAD_BIAS in observed else None


def full_model(sent: RecordDict, reply: RecordDict, public: Public) -> Scene:
    """FedAvg: the whole model goes down and comes back; every parameter trains."""
    model = _target(public)
    down, up = _arrays(sent), _arrays(reply)
    names = [n for n, _ in model.named_parameters()]
    fixed = {k: v for k, v in down.items() if k not in names}
    observed = {k: up[k] - down[k] for k in names}

    def forward(params: Tensors, unknowns: Tensors, x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, {**fixed, **params}, (x,))  # type: ignore[no-any-return]

    return _local_training(
        lambda unknowns: {k: down[k] for k in names},
        forward,
        observed,
        public,
        reply,
        model,
    )


def lora_factors(sent: RecordDict, reply: RecordDict, public: Public) -> Scene:
    """FLoRA / FedIT: the server sees the trained LoRA factors and the modules
    trained in full, never a dense update.

    The factors' start is public protocol: ``B = 0`` and ``A`` drawn from the
    round's shared seed (:func:`fedsim.learn.lora.inject_lora`); the base is the
    one every process builds, overwritten by the sent weights.
    """
    from fedsim.learn.lora import initial_a, lora_pairs

    exp = public.experiment
    model = _target(public)
    model.load_state_dict(_arrays(sent), strict=False)
    base = {k: v.detach() for k, v in model.state_dict().items()}
    up = _arrays(reply)
    metrics = reply.metric_records[METRICS]
    rank = int(metrics[LORA_RANK])  # type: ignore[arg-type]
    scaling = float(metrics[LORA_SCALING])  # type: ignore[arg-type]
    pairs = lora_pairs(up)
    init_seed = derive_seed(exp.seed, "lora-init", public.server_round)
    start: Tensors = {}
    for module, (a_key, b_key) in pairs.items():
        d_out, d_in = base[f"{module}.weight"].shape
        start[a_key] = initial_a(exp.peft, module, d_in, rank, init_seed)
        start[b_key] = torch.zeros(d_out, rank)
    lora = {k for pair in pairs.values() for k in pair}
    for key in up:
        if key not in lora:
            start[key] = base[key]
    observed = {k: up[k] - start[k] for k in start}

    def forward(params: Tensors, unknowns: Tensors, x: torch.Tensor) -> torch.Tensor:
        weights = {k: v for k, v in params.items() if k not in lora}
        for module, (a_key, b_key) in pairs.items():
            w = base[f"{module}.weight"]
            weights[f"{module}.weight"] = w + scaling * params[b_key] @ params[a_key]
        return functional_call(model, {**base, **weights}, (x,))  # type: ignore[no-any-return]

    return _local_training(
        lambda unknowns: dict(start), forward, observed, public, reply, model
    )


def _clip(grads: Tensors, groups: tuple[tuple[str, ...], ...], bound: float) -> Tensors:
    out = dict(grads)
    for group in groups:
        norm = torch.sqrt(sum(grads[k].pow(2).sum() for k in group))  # type: ignore[arg-type]
        coef = torch.clamp(bound / (norm + 1e-6), max=1.0)
        for k in group:
            out[k] = grads[k] * coef
    return out


def simulate(
    scene: Scene, x: torch.Tensor, y: torch.Tensor, unknowns: Mapping[str, Any]
) -> Tensors:
    """Replay local training on ``(x, y)`` from ``scene.start(unknowns)`` and
    return the update of the tensors ``scene.observed`` names, differentiable
    in ``x``, ``y`` (class indices, or probabilities) and ``unknowns``.

    The examples go through in their order, ``batch-size`` at a time (the last
    batch smaller), every epoch.
    """
    guess = dict(unknowns)
    first = scene.start(guess)
    params = {
        k: v if v.requires_grad else v.clone().requires_grad_(True)
        for k, v in first.items()
    }
    opt = scene.optimizer
    state: dict[str, list[torch.Tensor]] = {}
    names = list(params)
    step = 0
    for _ in range(scene.epochs):
        for lo in range(0, len(x), scene.batch_size):
            step += 1
            logits = scene.forward(params, guess, x[lo : lo + scene.batch_size])
            loss = F.cross_entropy(logits, y[lo : lo + scene.batch_size])
            grads = torch.autograd.grad(
                loss, [params[k] for k in names], create_graph=True, allow_unused=True
            )
            g = {
                k: torch.zeros_like(params[k]) if gk is None else gk
                for k, gk in zip(names, grads)
            }
            if opt.groups:
                g = _clip(g, opt.groups, opt.max_grad_norm)
            params = {
                k: params[k] - _direction(opt, k, g[k], params[k], state, step)
                for k in names
            }
    return {k: params[k] - first[k] for k in scene.observed}


def _direction(
    opt: LocalOptimizer,
    key: str,
    grad: torch.Tensor,
    param: torch.Tensor,
    state: dict[str, list[torch.Tensor]],
    step: int,
) -> torch.Tensor:
    """``lr`` times the step of PyTorch's SGD or Adam for one tensor."""
    if opt.weight_decay:
        grad = grad + opt.weight_decay * param
    if opt.kind == "adam":
        b1, b2 = opt.betas
        m, v = state.get(key, [torch.zeros_like(grad), torch.zeros_like(grad)])
        m, v = b1 * m + (1 - b1) * grad, b2 * v + (1 - b2) * grad * grad
        state[key] = [m, v]
        m_hat, v_hat = m / (1 - b1**step), v / (1 - b2**step)
        # sqrt's gradient at 0 is infinite: a tiny floor keeps it finite
        return opt.lr * m_hat / (torch.sqrt(v_hat + 1e-20) + opt.eps)
    if opt.momentum:
        buf = state[key][0] * opt.momentum + grad if key in state else grad
        state[key] = [buf]
        grad = buf
    return opt.lr * grad


#: The attacks a weight update feeds (``audit.attack`` must name them).
GRADIENT_ATTACKS = ("inverting-gradients", "analytic", "analytic-multistep")
full_model.attacks = GRADIENT_ATTACKS  # type: ignore[attr-defined]
lora_factors.attacks = GRADIENT_ATTACKS  # type: ignore[attr-defined]
