"""Width-sliced sub-models and the memory a client needs to train a model.

HeteroFL-style slicing (Diao et al., ICLR 2021): a client of width ratio ``r``
holds the first ``ceil(r * n)`` output units (channels, hidden units) of every
hidden layer; the first layer keeps its full input, the ``head`` its full
output. Every sliced parameter is a leading block (``full[:a, :b, ...]``) of
the full one, so a sub-model's state dict is a set of prefix slices of the
global model's, under the same names.

The packaged ``mlp`` and ``cnn`` are chains of ``Linear`` / ``Conv2d`` layers
(with element-wise activations, max-pooling, dropout and one flatten between
them), which is what the slicing needs: a layer's input units are the previous
layer's output units, and after the flatten each channel becomes a contiguous
block of ``height x width`` features, so a prefix of channels is a prefix of
features.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from fedsim.core.capacity import check_per_client
from fedsim.core.errors import ConfigError

#: The packaged models whose layers form a chain that width slicing supports.
SLICEABLE = ("mlp", "cnn")
#: Name of the output layer, which keeps all its outputs.
HEAD = "head"

#: Parameter name -> the kept size of each dimension.
Plan = dict[str, tuple[int, ...]]


def kept(units: int, ratio: float) -> int:
    """Units a client of width ``ratio`` keeps (HeteroFL: ``ceil(ratio * n)``)."""
    return max(1, math.ceil(ratio * units - 1e-9))


def chain(model: nn.Module) -> list[tuple[str, nn.Linear | nn.Conv2d]]:
    """The model's ``Linear`` / ``Conv2d`` layers in forward order; the last one
    must be ``head``."""
    layers = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
    ]
    if not layers or layers[-1][0] != HEAD:
        raise ConfigError(
            "model.name: width slicing needs a chain of Linear/Conv2d layers "
            f"ending in '{HEAD}'; choose one of: {', '.join(SLICEABLE)}"
        )
    return layers


def width_plan(model: nn.Module, ratio: float) -> Plan:
    """Kept size of every parameter of ``model`` at width ``ratio``.

    Parameters
    ----------
    model : nn.Module
        A full-width model whose layers form a chain (see :func:`chain`).
    ratio : float
        Width ratio in (0, 1].

    Returns
    -------
    dict of str to tuple of int
        Parameter name -> the leading block kept in each dimension.
    """
    layers = chain(model)
    plan: Plan = {}
    prev_full = prev_kept = 0
    for i, (name, layer) in enumerate(layers):
        out_full, in_full, *rest = layer.weight.shape
        out_kept = out_full if i == len(layers) - 1 else kept(out_full, ratio)
        if i == 0:
            in_kept = in_full
        else:
            if in_full % prev_full:
                raise ConfigError(
                    f"model: layer {name!r} takes {in_full} inputs, not a multiple "
                    f"of the {prev_full} units before it; it cannot be width-sliced"
                )
            in_kept = prev_kept * (in_full // prev_full)
        plan[f"{name}.weight"] = (out_kept, in_kept, *rest)
        if layer.bias is not None:
            plan[f"{name}.bias"] = (out_kept,)
        prev_full, prev_kept = out_full, out_kept
    missing = {n for n, _ in model.named_parameters()} - set(plan)
    if missing:
        raise ConfigError(
            f"model.name: parameters outside Linear/Conv2d layers "
            f"({sorted(missing)[0]!r}) cannot be width-sliced; choose one of: "
            f"{', '.join(SLICEABLE)}"
        )
    return plan


def block(shape: tuple[int, ...]) -> tuple[slice, ...]:
    """The index of a leading block of ``shape``."""
    return tuple(slice(0, s) for s in shape)


def slice_arrays(arrays: Mapping[str, np.ndarray], plan: Plan) -> dict[str, np.ndarray]:
    """The leading blocks of ``arrays`` that ``plan`` keeps (contiguous copies)."""
    return {k: np.ascontiguousarray(arrays[k][block(s)]) for k, s in plan.items()}


def _resized(layer: nn.Linear | nn.Conv2d, shape: tuple[int, ...]) -> nn.Module:
    bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        return nn.Linear(shape[1], shape[0], bias=bias)
    return nn.Conv2d(
        shape[1],
        shape[0],
        layer.kernel_size,  # type: ignore[arg-type]
        stride=layer.stride,  # type: ignore[arg-type]
        padding=layer.padding,  # type: ignore[arg-type]
        dilation=layer.dilation,  # type: ignore[arg-type]
        bias=bias,
    )


def sub_model(model: nn.Module, ratio: float) -> nn.Module:
    """A copy of ``model`` at width ``ratio``, holding the leading blocks of its
    weights (same parameter names)."""
    plan = width_plan(model, ratio)
    sub = copy.deepcopy(model)
    for name, layer in chain(sub):
        parent, _, child = name.rpartition(".")
        owner = sub.get_submodule(parent) if parent else sub
        resized = _resized(layer, plan[f"{name}.weight"]).to(layer.weight)
        setattr(owner, child, resized)
    full = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in sub.named_parameters():
            p.copy_(full[name][block(plan[name])])
    return sub


#: Train-reply record of a client's label split (HeteroFL's masking).
LABEL_SPLIT = "label-split"


class WidthHooks:
    """HeteroFL's reference-code additions to a sub-model, as forward hooks.

    - Scaler (``modules.Scaler``): while training, every hidden layer's output
      is divided by the width ratio (the model's ``rate / global_rate``), so a
      sub-model's activations have the full model's scale; in evaluation it
      is the identity.
    - Label-split masking (``cfg['mask']``): the logits of the classes not in
      :attr:`labels` are set to 0 (``masked_fill(mask == 0, 0)``), in training
      and in the client's own evaluation, as the reference's local model does.

    Parameters
    ----------
    model : nn.Module
        A (sub-)model whose layers form a chain ending in ``head``.
    ratio : float
        Its width ratio.
    scaler, mask : bool
        Which of the two to add.
    """

    def __init__(self, model: nn.Module, ratio: float, *, scaler: bool, mask: bool):
        self.ratio = ratio
        #: The classes the current client holds (None: no masking).
        self.labels: list[int] | None = None
        layers = chain(model)
        if scaler:
            for _, layer in layers[:-1]:
                layer.register_forward_hook(self._scale)
        if mask:
            layers[-1][1].register_forward_hook(self._mask)

    def _scale(
        self, module: nn.Module, _inputs: object, out: torch.Tensor
    ) -> torch.Tensor:
        return out / self.ratio if module.training else out

    def _mask(
        self, _module: nn.Module, _inputs: object, out: torch.Tensor
    ) -> torch.Tensor:
        if self.labels is None:
            return out
        keep = torch.zeros(out.shape[-1], dtype=torch.bool, device=out.device)
        keep[self.labels] = True
        return out.masked_fill(~keep, 0.0)


def label_split(labels: np.ndarray) -> list[int]:
    """The classes a client holds (HeteroFL's ``label_split``)."""
    return sorted(int(c) for c in np.unique(labels))


def parameter_count(model: nn.Module) -> int:
    """Trainable and frozen parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


def activation_elements(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Elements of every leaf module's output in one forward pass of one example
    (what back-propagation keeps), plus the input."""
    total = math.prod(input_shape)
    counted: list[int] = []

    def hook(_m: nn.Module, _i: object, out: object) -> None:
        if isinstance(out, torch.Tensor):
            counted.append(out[0].numel())

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        for h in handles:
            h.remove()
    return total + sum(counted)


def training_memory_bytes(
    model: nn.Module,
    input_shape: tuple[int, ...],
    batch_size: int,
    *,
    optimizer_slots: int = 1,
    bytes_per_element: int = 4,
) -> int:
    """Memory to train ``model`` on batches of ``batch_size``: every trainable
    parameter with its gradient and ``optimizer_slots`` optimizer buffers (SGD
    momentum: 1), every frozen parameter once (or a tensor of its size computed
    in the forward pass, e.g. a weight rebuilt from factors), and the
    activations of one batch. Counted, not measured: no CUDA needed.
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = parameter_count(model) - trainable
    params = trainable * (2 + optimizer_slots) + frozen
    activations = activation_elements(model, input_shape) * batch_size
    return (params + activations) * bytes_per_element


def check_sliceable(experiment: object, model: nn.Module, data: object) -> None:
    """Pre-run check of the width-slicing families: every configured width of
    the experiment's model can be built, and every one goes to some client."""
    capacities = experiment.strategy.options.capacities  # type: ignore[attr-defined]
    clients = experiment.federation.clients  # type: ignore[attr-defined]
    check_per_client("strategy.capacities", capacities, clients)
    for ratio in capacities:
        width_plan(model, ratio)
