"""HyperFL's surface: what the server sees of a client's round, the
hypernetwork it uploads (:func:`hypernetwork`, ``Family.audit`` of ``hyperfl``).

The client's embedding and classifier head are private, so the attacker
optimises guesses of them with the inputs (the HyperFL paper's threat model);
with ``strategy.share = "trunk"`` the hypernetwork's output heads are private
too, and are guessed the same way, starting from the seeded round-1 heads every
process can build (:func:`fedsim.learn.hypernet.initial_hypernetwork`). The
analytic attacks read the generated weights' gradients off the output heads'
updates where they are uploaded (:func:`generated_linear`).
"""

from __future__ import annotations

import math

import torch
from flwr.app import RecordDict
from torch import nn
from torch.func import functional_call

from fedsim.audit.linear import LinearTensors, input_linear, linear_layers
from fedsim.audit.replay import (
    GRADIENT_ATTACKS,
    LocalOptimizer,
    Public,
    Scene,
    Tensors,
    _arrays,
    _examples,
    _target,
)
from fedsim.core.seeding import derive_seed

#: HyperFL's private tensors, as the attacker names its guesses.
EMBEDDING = "embedding"


def hypernetwork(sent: RecordDict, reply: RecordDict, public: Public) -> Scene:
    """HyperFL: only the hypernetwork (or its trunk) is shared; the client's
    embedding and head (and private output heads) are unknowns.

    The replay is the hypernetwork-and-embedding phase (SGD with ``hyper-lr``,
    ``hyper-momentum``, ``weight-decay``, the hypernetwork's and the
    embedding's gradient norms clipped at ``max-grad-norm`` separately;
    ``train.epochs`` epochs); the head phase before it changes only the
    private head, which the attacker optimises directly.
    """
    from fedsim.learn.hypernet import extractor_shapes

    target = _target(public)
    return _scene(sent, reply, public, target, extractor_shapes(target))


def lpm_hypernetwork(sent: RecordDict, reply: RecordDict, public: Public) -> Scene:
    """HyperFL-LPM: as :func:`hypernetwork`, the generated tensors being LoRA
    factors of the frozen pre-trained base (the client's own construction:
    PEFT's adapters injected, their values replaced by generated ones)."""
    from fedsim.learn.hypernet import lora_shapes
    from fedsim.learn.lora import inject_lora, lora_layout

    exp = public.experiment
    target = _target(public)
    shapes = lora_shapes(target, exp.peft)
    layout = lora_layout(target, exp.peft)
    inject_lora(target, exp.peft, layout, rank=exp.peft.rank, init_seed=0)
    target.requires_grad_(False)
    return _scene(sent, reply, public, target, shapes)


def _scene(
    sent: RecordDict,
    reply: RecordDict,
    public: Public,
    target: nn.Module,
    shapes: dict[str, torch.Size],
) -> Scene:
    from fedsim.learn.hypernet import initial_hypernetwork, is_head

    exp = public.experiment
    opts = exp.strategy.options
    net = initial_hypernetwork(shapes, opts, exp.seed)
    net.requires_grad_(False)
    down, up = _arrays(sent), _arrays(reply)
    every = [n for n, _ in net.named_parameters()]
    shared = [n for n in every if n in down]
    observed = {k: up[k] - down[k] for k in shared}
    head = {n: p.detach().clone() for n, p in target.named_parameters() if is_head(n)}
    gen = torch.Generator().manual_seed(derive_seed(exp.seed, "audit-guess"))
    unknowns = {EMBEDDING: torch.randn(opts.embedding_dim, generator=gen)}
    for name, value in head.items():
        bound = 1.0 / math.sqrt(value.shape[-1] if value.dim() > 1 else len(value))
        unknowns[name] = torch.empty_like(value).uniform_(-bound, bound, generator=gen)
    private = {n: p.detach().clone() for n, p in net.named_parameters()}
    unknowns.update({n: private[n] for n in every if n not in down})

    def start(guess: Tensors) -> Tensors:
        own = {k: guess[k] for k in every if k not in down}
        return {**{k: down[k] for k in shared}, **own, EMBEDDING: guess[EMBEDDING]}

    def forward(params: Tensors, guess: Tensors, x: torch.Tensor) -> torch.Tensor:
        hyper_params = {k: params[k] for k in every}
        generated = functional_call(net, hyper_params, (params[EMBEDDING],))
        heads = {k: guess[k] for k in head}
        return functional_call(target, {**generated, **heads}, (x,), strict=False)  # type: ignore[no-any-return]

    return Scene(
        start=start,
        forward=forward,
        observed=observed,
        optimizer=LocalOptimizer(
            "sgd",
            opts.hyper_lr,
            opts.hyper_momentum,
            opts.weight_decay,
            groups=(tuple(every), (EMBEDDING,)),
            max_grad_norm=opts.max_grad_norm,
        ),
        epochs=exp.train.epochs,
        batch_size=exp.train.batch_size,
        examples=_examples(reply),
        unknowns=unknowns,
        linear=generated_linear(target, observed),
        input_layer=input_linear(target, public.info.input_shape),
    )


def generated_linear(target: nn.Module, observed: Tensors) -> dict[str, LinearTensors]:
    """HyperFL's generated linear layers (with bias) and where the upload
    carries their gradients: generated tensor ``t = H_t h + c_t`` (``h`` the
    hypernetwork's shared features), so the update of the output head's bias
    ``c_t`` is the gradient of ``t``; without head biases, the head's weight
    ``H_t``, whose gradient is ``dL/dt h^T`` (:class:`LinearTensors`); none
    when the output heads stay private."""
    from fedsim.learn.hypernet import module_key

    out = {}
    for name, shape in linear_layers(target).items():
        w, b = (f"heads.{module_key(f'{name}.{kind}')}" for kind in ("weight", "bias"))
        if f"{w}.bias" in observed and f"{b}.bias" in observed:
            out[name] = LinearTensors(f"{w}.bias", f"{b}.bias", shape)
        elif f"{w}.weight" in observed and f"{b}.weight" in observed:
            out[name] = LinearTensors(f"{w}.weight", f"{b}.weight", shape, outer=True)
    return out


hypernetwork.attacks = GRADIENT_ATTACKS  # type: ignore[attr-defined]
lpm_hypernetwork.attacks = GRADIENT_ATTACKS  # type: ignore[attr-defined]
