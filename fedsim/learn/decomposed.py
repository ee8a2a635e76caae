"""Layers decomposed into general and personal parameters (Pa3dFL).

Every ``Linear`` / ``Conv2d`` weight of a width-sliced model
(:mod:`fedsim.learn.capacity`), seen as a matrix ``(out, in * kh * kw)``, is
the product ``W = U @ G @ V``:

- ``G`` (``rank x rank``, name ``<layer>.G``): the general parameters, the same
  size on every client whatever its width;
- ``U`` (``out x rank``, ``<layer>.U``) and ``V`` (``rank x in * kh * kw``,
  ``<layer>.V``): the personal parameters, sized to the client's width. At
  full width they have the full model's ``out`` and ``in``; a client of width
  ``r`` holds their leading rows of ``U`` and leading columns of ``V`` (the
  units :func:`fedsim.learn.capacity.width_plan` keeps).

The biases stay in the sliced model (:class:`DecomposedModel` keeps them as the
target's own parameters).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn
from torch.func import functional_call

from fedsim.learn.capacity import Plan, chain, sub_model, width_plan

#: Suffixes of the three factors of a layer.
GENERAL, LEFT, RIGHT = "G", "U", "V"


def _key(name: str) -> str:
    return name.replace(".", "__")


def personal_shapes(model: nn.Module, rank: int) -> dict[str, torch.Size]:
    """Full-width shapes of every ``<layer>.U`` and ``<layer>.V`` of ``model``."""
    out: dict[str, torch.Size] = {}
    for name, layer in chain(model):
        rows, cols = layer.weight.shape[0], math.prod(layer.weight.shape[1:])
        out[f"{name}.{LEFT}"] = torch.Size((rows, rank))
        out[f"{name}.{RIGHT}"] = torch.Size((rank, cols))
    return out


def general_shapes(model: nn.Module, rank: int) -> dict[str, torch.Size]:
    """Shape of every ``<layer>.G`` (``rank x rank``)."""
    return {f"{name}.{GENERAL}": torch.Size((rank, rank)) for name, _ in chain(model)}


def personal_plan(plan: Plan, rank: int) -> Plan:
    """The leading block of every personal factor a width's ``plan`` keeps."""
    out: Plan = {}
    for name, shape in plan.items():
        if not name.endswith(".weight"):
            continue
        layer = name[: -len(".weight")]
        out[f"{layer}.{LEFT}"] = (shape[0], rank)
        out[f"{layer}.{RIGHT}"] = (rank, math.prod(shape[1:]))
    return out


class DecomposedModel(nn.Module):
    """A width-sliced model whose weights are ``U @ G @ V``.

    Parameters
    ----------
    full : nn.Module
        The full-width model (its architecture and initial biases).
    ratio : float
        The client's width.
    rank : int
        Size of the general core ``G``.
    """

    def __init__(self, full: nn.Module, ratio: float, rank: int):
        super().__init__()
        self.target = sub_model(full, ratio)
        self.plan = width_plan(full, ratio)
        self.layers = [name for name, _ in chain(self.target)]
        for name in self.layers:
            self.target.get_submodule(name).weight.requires_grad_(False)
        shapes = personal_plan(self.plan, rank)
        self.general = nn.ParameterDict(
            {_key(n): nn.Parameter(torch.zeros(rank, rank)) for n in self.layers}
        )
        self.personal = nn.ParameterDict(
            {_key(n): nn.Parameter(torch.zeros(s)) for n, s in shapes.items()}
        )

    def factors(self) -> dict[str, nn.Parameter]:
        """Every factor by its name (``<layer>.G``, ``.U``, ``.V``)."""
        out = {f"{n}.{GENERAL}": self.general[_key(n)] for n in self.layers}
        for name in self.layers:
            for part in (LEFT, RIGHT):
                out[f"{name}.{part}"] = self.personal[_key(f"{name}.{part}")]
        return out

    def load_factors(self, values: Mapping[str, torch.Tensor]) -> None:
        """Copy factors in by name (every factor must be given)."""
        own = self.factors()
        if set(values) != set(own):
            diff = sorted(set(values) ^ set(own))
            raise ValueError(f"factors differ from the model's: {diff[0]!r}")
        with torch.no_grad():
            for name, value in values.items():
                own[name].copy_(value)

    def weights(self) -> dict[str, torch.Tensor]:
        """Every layer's weight ``U @ G @ V``, in the layer's shape."""
        out = {}
        for name in self.layers:
            shape = self.plan[f"{name}.weight"]
            u = self.personal[_key(f"{name}.{LEFT}")]
            v = self.personal[_key(f"{name}.{RIGHT}")]
            out[f"{name}.weight"] = (u @ self.general[_key(name)] @ v).view(shape)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.target, self.weights(), (x,))  # type: ignore[no-any-return]

    def biases(self) -> dict[str, torch.Tensor]:
        """The sliced model's biases (CPU copies): the client's private state."""
        return {
            n: p.detach().cpu().clone()
            for n, p in self.target.named_parameters()
            if n.endswith(".bias")
        }

    def load_biases(self, values: Mapping[str, torch.Tensor]) -> None:
        params = dict(self.target.named_parameters())
        with torch.no_grad():
            for name, value in values.items():
                params[name].copy_(value)
