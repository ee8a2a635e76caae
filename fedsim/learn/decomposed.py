"""Layers decomposed into general and personal parameters (Pa3dFL's
channel-aware decomposition, Wang et al. 2024, Eq. 3-5 and 10).

A ``Linear`` / ``Conv2d`` weight ``theta`` of ``T`` output units, ``S`` input
units and a ``k x k`` kernel (``k = 1`` for ``Linear``) is

    theta'  =  [u_1; ...; u_R1]  @  [v_1, ..., v_{T/R1}]  =  theta_u @ theta_v

with ``u_i`` of shape ``(k^2, R2)`` and ``v_j`` of shape ``(R2, S)``: the
kernel of output unit ``(j, i)`` on input unit ``s`` is ``u_i @ v_j[:, s]``.
Every ``u_i`` is shared by the ``T / R1`` units of its position ``i`` in each
block of ``R1`` units (channel-aware general parameters); each ``v_j`` holds a
block of ``R1`` units' personal parameters. Eq. 5: ``R1 = T * p_min`` (the
units the smallest width keeps), ``R2 = max(min(S, T), k^2)`` for a
convolution, ``R2 = R1`` for a linear layer.

Here output unit ``(j, i)`` is unit ``j * R1 + i`` of the layer, so a client of
width ``p`` keeping the first ``p T`` units (:func:`fedsim.learn.capacity.width_plan`)
holds every ``u_i`` and the leading ``p T / R1`` blocks ``v_j`` restricted to
its first ``p S`` inputs (Eq. 10: ``theta_u`` is never pruned).

Stored shapes (names ``<layer>.u``, ``<layer>.v``): ``u`` is ``(R1, k^2, R2)``,
general, the same on every client; ``v`` is ``(R2, T / R1, S)`` at full width,
personal, and a client holds its leading block ``(R2, p T / R1, p S)``. The
biases stay in the sliced model (:class:`DecomposedModel` keeps them as the
target's own parameters).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from fedsim.core.capacity import check_per_client
from fedsim.core.errors import ConfigError
from fedsim.learn.capacity import Plan, chain, sub_model, width_plan

#: Suffixes of a layer's general and personal parameters.
GENERAL, PERSONAL = "u", "v"


@dataclass(frozen=True)
class Factors:
    """One layer's decomposition sizes (Eq. 5) at full width."""

    #: Output units ``T``, input units ``S``, kernel elements ``k^2``.
    out: int
    inputs: int
    kernel: int
    #: Units per block ``R1``, inner size ``R2``.
    r1: int
    r2: int

    @property
    def blocks(self) -> int:
        """Blocks of ``R1`` units (``T / R1``)."""
        return self.out // self.r1

    @property
    def general_shape(self) -> tuple[int, int, int]:
        return (self.r1, self.kernel, self.r2)

    @property
    def personal_shape(self) -> tuple[int, int, int]:
        return (self.r2, self.blocks, self.inputs)


def _key(name: str) -> str:
    return name.replace(".", "__")


def factors_of(model: nn.Module, capacities: Sequence[float]) -> dict[str, Factors]:
    """Every layer's :class:`Factors` for a federation of ``capacities``.

    Raises
    ------
    ConfigError
        When a width keeps a number of units that is not a whole number of
        blocks of the smallest width's units (the decomposition needs
        ``R1 | p T`` for every width ``p``).
    """
    smallest = width_plan(model, min(capacities))
    plans = {p: width_plan(model, p) for p in set(capacities)}
    out: dict[str, Factors] = {}
    for name, layer in chain(model):
        weight = layer.weight
        units, inputs = weight.shape[0], weight.shape[1]
        kernel = math.prod(weight.shape[2:])
        r1 = smallest[f"{name}.weight"][0]
        for p, plan in sorted(plans.items()):
            kept = plan[f"{name}.weight"][0]
            if kept % r1 or units % r1:
                raise ConfigError(
                    f"strategy.capacities: layer {name!r} keeps {kept} of {units} "
                    f"units at width {p}, not a multiple of the {r1} the smallest "
                    "width keeps (Pa3dFL's blocks); choose widths whose units are "
                    "whole multiples of the smallest's"
                )
        r2 = r1 if isinstance(layer, nn.Linear) else max(min(inputs, units), kernel)
        out[name] = Factors(units, inputs, kernel, r1, r2)
    return out


def personal_plan(plan: Plan, factors: Mapping[str, Factors]) -> Plan:
    """The leading block of every ``<layer>.v`` a width's ``plan`` keeps."""
    out: Plan = {}
    for name, f in factors.items():
        kept_out, kept_in = plan[f"{name}.weight"][:2]
        out[f"{name}.{PERSONAL}"] = (f.r2, kept_out // f.r1, kept_in)
    return out


def compose(u: torch.Tensor, v: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The weight ``theta_u @ theta_v`` in the layer's ``shape``: unit
    ``j * R1 + i``, input ``s``, kernel position ``q`` is ``u[i, q] @ v[:, j, s]``.
    """
    r1, blocks = u.shape[0], v.shape[1]
    w = torch.einsum("iqr,rjs->jisq", u, v).reshape(blocks * r1, v.shape[2], -1)
    return w.reshape(tuple(shape))


def general_for(weight: torch.Tensor, v: torch.Tensor, r1: int) -> torch.Tensor:
    """The ``u`` whose :func:`compose` with ``v`` is closest to ``weight`` in
    Frobenius norm (per position ``i``: ``M_i @ pinv(V)``, ``V`` the blocks of
    ``v`` side by side)."""
    r2, blocks, inputs = v.shape
    w = weight.reshape(blocks, r1, inputs, -1)  # (j, i, s, q)
    m = w.permute(1, 3, 0, 2).reshape(r1, w.shape[-1], blocks * inputs)
    return m @ torch.linalg.pinv(v.reshape(r2, blocks * inputs))


def scaled_general_for(weight: torch.Tensor, v: torch.Tensor, r1: int) -> torch.Tensor:
    """:func:`general_for`, rescaled so that its :func:`compose` with ``v`` has
    the Frobenius norm of ``weight``.

    The least-squares fit keeps only the part of ``weight`` that the rank-``R2``
    blocks can express (about a quarter of its norm for the packaged ``mlp``);
    a network of such layers passes about ``4^-depth`` of its input's scale to
    the logits and barely trains. Rescaling keeps the fit's direction and the
    initial model's per-layer scale (its initialiser's variance).
    """
    u = general_for(weight, v, r1)
    norm = compose(u, v, weight.shape).norm()
    return u * (weight.norm() / norm) if norm > 0 else u


class DecomposedModel(nn.Module):
    """A width-sliced model whose weights are ``compose(u, v)``.

    Parameters
    ----------
    full : nn.Module
        The full-width model (its architecture and initial biases).
    ratio : float
        The client's width.
    factors : mapping of str to Factors
        The federation's decomposition (:func:`factors_of`).
    """

    def __init__(self, full: nn.Module, ratio: float, factors: Mapping[str, Factors]):
        super().__init__()
        self.target = sub_model(full, ratio)
        self.plan = width_plan(full, ratio)
        self.layers = list(factors)
        for name in self.layers:
            self.target.get_submodule(name).weight.requires_grad_(False)
        personal = personal_plan(self.plan, factors)
        self.general = nn.ParameterDict(
            {
                _key(n): nn.Parameter(torch.zeros(f.general_shape))
                for n, f in factors.items()
            }
        )
        self.personal = nn.ParameterDict(
            {_key(n): nn.Parameter(torch.zeros(s)) for n, s in personal.items()}
        )

    def factors(self) -> dict[str, nn.Parameter]:
        """Every factor by its name (``<layer>.u``, ``<layer>.v``)."""
        out = {f"{n}.{GENERAL}": self.general[_key(n)] for n in self.layers}
        for name in self.layers:
            key = f"{name}.{PERSONAL}"
            out[key] = self.personal[_key(key)]
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
        """Every layer's weight ``compose(u, v)``, in the layer's shape."""
        out = {}
        for name in self.layers:
            u = self.general[_key(name)]
            v = self.personal[_key(f"{name}.{PERSONAL}")]
            out[f"{name}.weight"] = compose(u, v, self.plan[f"{name}.weight"])
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


def check_decomposable(experiment: object, model: nn.Module, data: object) -> None:
    """Pre-run check of Pa3dFL: every width slices and decomposes, and every
    one goes to some client."""
    capacities = experiment.strategy.options.capacities  # type: ignore[attr-defined]
    clients = experiment.federation.clients  # type: ignore[attr-defined]
    check_per_client("strategy.capacities", capacities, clients)
    factors_of(model, capacities)
