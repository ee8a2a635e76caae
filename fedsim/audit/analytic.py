"""Analytic attacks: inputs read off the uploaded update of a linear layer with
bias, no optimisation.

For a linear layer ``y = W x + b`` on one example, ``dL/dW = (dL/dy) x^T`` and
``dL/db = dL/dy``, so every row ``i`` with ``dL/db_i != 0`` gives the input
exactly: ``x = (dL/dW)_i / (dL/db)_i`` (Phong et al., "Privacy-Preserving Deep
Learning: Revisited and Enhanced", ATIS 2017, and "... via Additively
Homomorphic Encryption", IEEE TIFS 2018; Fowl et al., "Robbing the Fed:
Directly Obtaining Private Data in Federated Learning with Modified Models",
ICLR 2022, build malicious layers on the same ratio; here the server is honest
and only reads). On a batch the row holds ``sum_j delta_ij x_j / sum_j
delta_ij``: a mixture, except in rows whose unit was active (ReLU after it)
for one example only, which hold an exact copy of that example. Several such
rows hold the *same* copy, so copies show as identical rows: the attack groups
the rows' ratios (relative distance below ``1e-3``) and returns the largest
groups, then single rows whose ratio lies in the inputs' range (images: [0,
1]; a mixture with weights of both signs falls outside), strongest first,
one reconstruction per example.

Only the linear layer whose input is the raw input (an MLP's first layer,
:func:`fedsim.audit.linear.input_linear`) gives images; the surface says where
the upload carries its gradients (:class:`fedsim.audit.linear.LinearTensors`):

- FedAvg (and DP-SGD under it): the layer's own weight and bias updates.
- HyperFL: the generated tensor ``t = H_t h + c_t`` of each output head, so the
  update of the head bias ``c_t`` is ``-lr (s dL/dt + wd c_t)`` (``s`` the
  hypernetwork group's clipping factor, the same for every tensor): the exact
  gradient of the generated weights, without the private embedding or head.
  Heads without bias (``strategy.head-bias = false``) do not hide it: the head
  weight's update is ``-lr (s dL/dt h^T + wd H_t)``, each column ``h_k`` times
  the gradient (the attack takes the column with the largest norm).
- FLoRA / FedIT: the first layer is adapted by LoRA factors, its bias not
  uploaded: not applicable (the head's ratio would give features, not images).

Two attacks, chosen in ``audit.attack``:

``analytic``
    Assumes the update is one local step of SGD (momentum irrelevant at the
    first step; weight decay removed exactly at the start values the server
    sent). Not applicable (:class:`NotApplicable`, with the reason) with
    several local steps (``epochs * ceil(examples / batch-size)``), with Adam
    (its first step is ``lr g / (|g| + eps)``, not a multiple of the gradient),
    or when no uploaded linear layer with bias takes the raw input.
``analytic-multistep``
    Several steps of SGD with momentum: the update is ``sum_t a_t g_t`` with
    the same scalar ``a_t`` (times the step's clipping factor) for the weight
    and the bias, so a row whose unit was active for one example over all
    steps is still an exact copy of it. Weight decay is removed at the start
    values with the summed momentum weights (exact for one step, an
    approximation of order ``lr^2 wd`` per step otherwise). Not applicable with
    Adam or without an uploaded input layer, as above.

Under DP-SGD the update is a clipped, noised sum: the attacks run as if it
were not (the noise is the defence being measured). Deviations from the
papers: none in the ratio; the grouping of identical rows (to pick the copies
out of a batch) and the HyperFL head columns are this audit's.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from flwr.app import RecordDict

from fedsim.audit.linear import LinearTensors
from fedsim.audit.loop import Reconstruction
from fedsim.audit.replay import Public, Scene
from fedsim.core.experiment import AuditConfig

#: Rows whose bias gradient is below this share of the largest are left out.
BIAS_FLOOR = 1e-6
#: Two rows' ratios closer than this (relative L2 distance) are one copy.
SAME_ROW = 1e-3


class NotApplicable(Exception):
    """The attack's assumptions fail for this upload; the message says which."""


def summed_momentum(steps: int, momentum: float) -> float:
    """``sum_t a_t``: the total weight SGD with momentum ``mu`` gives the
    gradients of ``steps`` steps in the final update, ``a_t = sum_{k=0}^{T-t}
    mu^k`` (1 for one step; ``T (T + 1) / 2`` for ``mu = 1``)."""
    if momentum == 1.0:
        return steps * (steps + 1) / 2
    return sum(
        (1 - momentum ** (steps - t + 1)) / (1 - momentum) for t in range(1, steps + 1)
    )


def local_steps(scene: Scene) -> int:
    """The client's local SGD steps: ``epochs * ceil(examples / batch_size)``."""
    return scene.epochs * math.ceil(scene.examples / scene.batch_size)


def layer_gradient(
    scene: Scene, layer: LinearTensors, steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A negative multiple of the layer's (summed) weight and bias gradients,
    ``(out, in)`` and ``(out,)``, in float64, weight decay removed."""
    opt = scene.optimizer
    start = scene.start(scene.unknowns)
    decay = opt.lr * opt.weight_decay * summed_momentum(steps, opt.momentum)
    weight, bias = (
        scene.observed[key].double() + decay * start[key].detach().double()
        for key in (layer.weight, layer.bias)
    )
    if layer.outer:  # head weights: column k is h_k times the gradient
        k = int(torch.argmax(bias.norm(dim=0) + weight.norm(dim=0)))
        weight, bias = weight[:, k], bias[:, k]
    return weight.reshape(layer.shape), bias.reshape(-1)


def row_ratios(
    weight: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight_i / bias_i`` of the rows whose ``|bias_i|`` is at least
    :data:`BIAS_FLOOR` of the largest, and those ``|bias_i|``."""
    strength = bias.abs()
    if float(strength.max()) == 0.0:
        return weight[:0], strength[:0]
    keep = strength >= BIAS_FLOOR * strength.max()
    return weight[keep] / bias[keep, None], strength[keep]


def pick_copies(
    candidates: torch.Tensor,
    strength: torch.Tensor,
    n: int,
    *,
    box: tuple[float, float] | None = None,
) -> torch.Tensor:
    """``n`` reconstructions from the rows' ratios: rows closer than
    :data:`SAME_ROW` are grouped (strongest row first); the groups ranked by
    size, then (with ``box``, the inputs' known range) whether their ratio lies
    in the box (a ratio outside it, beyond :data:`SAME_ROW`, mixes examples with
    weights of both signs), then strength; fewer groups than ``n``: they
    repeat."""
    order = torch.argsort(strength, descending=True)
    groups: list[list[int]] = []
    for i in order.tolist():
        row = candidates[i]
        for group in groups:
            first = candidates[group[0]]
            if float((row - first).norm()) <= SAME_ROW * float(first.norm()):
                group.append(i)
                break
        else:
            groups.append([i])

    def outside(group: list[int]) -> bool:
        if box is None:
            return False
        row = candidates[group[0]]
        return float((row.clamp(*box) - row).abs().max()) > SAME_ROW

    ranked = sorted(
        groups, key=lambda g: (-len(g), outside(g), -float(strength[g].sum()))
    )
    chosen = [candidates[g[0]] for g in ranked[:n]]
    return torch.stack([chosen[i % len(chosen)] for i in range(n)])


def applicable_layer(scene: Scene, *, multistep: bool) -> LinearTensors:
    """The input layer's uploaded gradients, or :class:`NotApplicable`."""
    steps = local_steps(scene)
    if scene.optimizer.kind != "sgd":
        raise NotApplicable(
            f"local optimizer {scene.optimizer.kind}: its update is not a multiple "
            "of a sum of gradients"
        )
    if not multistep and steps != 1:
        raise NotApplicable(
            f"{steps} local steps: the one-step attack needs exactly one "
            "(analytic-multistep takes several)"
        )
    if scene.input_layer is None:
        raise NotApplicable(
            "no linear layer with a bias takes the raw input (a convolution or "
            "patch embedding comes first)"
        )
    if scene.input_layer not in scene.linear:
        raise NotApplicable(
            f"the upload does not carry the gradients of the input layer "
            f"{scene.input_layer!r}'s weight and bias (uploaded linear layers "
            f"with bias: {sorted(scene.linear) or 'none'})"
        )
    return scene.linear[scene.input_layer]


def analytic(
    sent: RecordDict,
    reply: RecordDict,
    public: Public,
    *,
    surface: object,
    settings: AuditConfig,
    generator: torch.Generator,
    labels: np.ndarray | None = None,
    multistep: bool = False,
) -> Reconstruction:
    """The bias/weight ratio attack on what the server saw (one reconstruction
    per example the client trained on); :class:`NotApplicable` where the
    assumptions in the module docstring fail. ``settings``, ``generator`` and
    ``labels`` are unused (no optimisation, no randomness), kept so every
    attack is called alike."""
    scene = surface(sent, reply, public)  # type: ignore[operator]
    if not isinstance(scene, Scene):
        raise NotApplicable("the upload holds activations, not a weight update")
    shape = public.info.input_shape
    n = scene.examples
    if n == 0:
        return Reconstruction(np.empty((0, *shape), np.float32), np.empty(0), 0.0)
    layer = applicable_layer(scene, multistep=multistep)
    weight, bias = layer_gradient(scene, layer, local_steps(scene))
    candidates, strength = row_ratios(weight, bias)
    if not len(candidates):
        raise NotApplicable(f"the input layer {scene.input_layer!r} did not move")
    image = len(shape) == 3  # pixels in [0, 1], as the inversion boxes them
    box = (0.0, 1.0) if image else None
    images = pick_copies(candidates, strength, n, box=box).reshape(n, *shape)
    if image:
        images = images.clamp(0.0, 1.0)
    return Reconstruction(images.float().numpy(), np.full(n, -1, np.int64), 0.0)
