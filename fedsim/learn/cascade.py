"""A model as a cascade of memory-bounded modules with auxiliary heads (FedProphet).

The packaged ``mlp`` / ``cnn`` are split into *atoms*: each ``Linear`` /
``Conv2d`` layer with the element-wise layers, pooling and flatten that follow
it (layers before the first one join the first atom). Atoms are grouped
greedily, in order, into *modules* whose training memory fits a budget
(FedProphet's ``model_partition``): a module's memory is its atoms'
parameters (with gradients and optimizer buffers) and output activations, plus
its auxiliary head's parameters, input and output. Counted in bytes from
shapes: no CUDA needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedsim.core.capacity import check_per_client
from fedsim.core.errors import ConfigError
from fedsim.learn.capacity import chain

#: Bytes per float32 element.
FLOAT = 4


@dataclass(frozen=True)
class Atom:
    """A layer with what follows it, and its shapes for one example."""

    name: str
    block: nn.Sequential
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    def params(self) -> int:
        return sum(p.numel() for p in self.block.parameters())


def atoms(model: nn.Module, input_shape: tuple[int, ...]) -> list[Atom]:
    """The model's atoms in forward order (sharing the model's modules)."""
    starts = {id(m): name for name, m in chain(model)}
    leaves = [m for m in model.modules() if not list(m.children())]
    groups: list[list] = []  # [layer name ("" before the first layer), leaves]
    for leaf in leaves:
        name = starts.get(id(leaf))
        if name is not None and (not groups or groups[-1][0]):
            groups.append([name, [leaf]])
        elif name is not None:  # the first group held only leaves before it
            groups[-1][0] = name
            groups[-1][1].append(leaf)
        elif groups:
            groups[-1][1].append(leaf)
        else:
            groups.append(["", [leaf]])
    out: list[Atom] = []
    shape = tuple(input_shape)
    with torch.no_grad():
        x = torch.zeros(1, *shape)
        for name, members in groups:
            block = nn.Sequential(*members)
            y = block(x)
            out.append(Atom(name, block, shape, tuple(y.shape[1:])))
            x, shape = y, tuple(y.shape[1:])
    return out


def aux_head(out_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """FedProphet's auxiliary head on a module's output: feature maps are first
    average-pooled to ``ceil(sqrt(classes / channels))`` per side."""
    if len(out_shape) == 3:
        channels, height, _ = out_shape
        side = math.ceil(math.sqrt(num_classes / channels))
        if height > side:
            return nn.Sequential(
                nn.AdaptiveAvgPool2d((side, side)),
                nn.Flatten(),
                nn.Linear(channels * side * side, num_classes),
            )
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(out_shape), num_classes))


def atom_bytes(atom: Atom, batch_size: int, optimizer_slots: int) -> int:
    """Training memory of one atom: parameters x (2 + slots), output activations
    of a batch."""
    params = atom.params() * (2 + optimizer_slots)
    return FLOAT * (params + batch_size * math.prod(atom.out_shape))


def aux_bytes(
    atom: Atom, num_classes: int, batch_size: int, optimizer_slots: int
) -> int:
    """An auxiliary head on ``atom``'s output: its parameters x (2 + slots), its
    input and its output for a batch."""
    head = aux_head(atom.out_shape, num_classes)
    params = sum(p.numel() for p in head.parameters()) * (2 + optimizer_slots)
    acts = batch_size * (math.prod(atom.out_shape) + num_classes)
    return FLOAT * (params + acts)


@dataclass(frozen=True)
class Partition:
    """Modules as lists of atom indices, and each module's memory in bytes
    (its auxiliary head included, except for the last module)."""

    modules: tuple[tuple[int, ...], ...]
    memory: tuple[int, ...]


def partition(
    parts: list[Atom],
    *,
    num_classes: int,
    batch_size: int,
    budget: float,
    optimizer_slots: int = 1,
) -> Partition:
    """Greedy partition: add atoms to the current module while it, with an
    auxiliary head on its last atom, fits ``budget`` bytes.

    The input of the first atom is counted in its module (the batch it
    receives); later modules receive cached features of the same size as the
    previous module's output, counted with that output.
    """
    sizes = [atom_bytes(a, batch_size, optimizer_slots) for a in parts]
    sizes[0] += FLOAT * batch_size * math.prod(parts[0].in_shape)
    heads = [aux_bytes(a, num_classes, batch_size, optimizer_slots) for a in parts]
    modules: list[tuple[int, ...]] = []
    memory: list[int] = []
    current: list[int] = []
    total = 0
    for i, size in enumerate(sizes):
        last = i == len(parts) - 1
        alone = size + (0 if last else heads[i])
        if alone > budget:
            raise ConfigError(
                f"strategy.memory-mb: layer {parts[i].name!r} alone needs "
                f"{alone / 1e6:.4f} MB to train, more than the smallest budget "
                f"{budget / 1e6:.4f} MB"
            )
        if current and total + alone > budget:
            modules.append(tuple(current))
            memory.append(total + heads[current[-1]])
            current, total = [], 0
        current.append(i)
        total += size
    modules.append(tuple(current))
    memory.append(total)
    return Partition(tuple(modules), tuple(memory))


def module_prefix(
    model_atoms: list[Atom], modules: tuple[tuple[int, ...], ...]
) -> nn.Sequential:
    """The given modules' atoms as one sequential network."""
    return nn.Sequential(*(model_atoms[i].block for m in modules for i in m))


# -- FedProphet's message vocabulary (shared by its server and client sides) ----
#: Config keys: the current stage (module index), how many prophet modules the
#: client also trains, the PGD radius at the stage's input, whether the stage's
#: input is bounded below by 0 (features after a ReLU; images: [0, 1]).
STAGE, PROPHETS, EPSILON, BOUNDED = "stage", "prophets", "epsilon", "bounded"
#: Custom action measuring feature perturbations at a stage's end.
PERTURBATION = "perturbation"


def aux_key(module: int) -> str:
    """Prefix of module ``module``'s auxiliary head's arrays."""
    return f"aux.{module}."


@dataclass(frozen=True)
class Cascade:
    """A model's atoms, their partition, each module's parameter names and the
    auxiliary heads (every module but the last)."""

    atoms: list[Atom]
    part: Partition
    names: list[list[str]]
    heads: dict[int, nn.Module]

    def net(self, first: int, last: int) -> nn.Sequential:
        """Modules ``first..last`` as one network."""
        return module_prefix(self.atoms, self.part.modules[first : last + 1])

    def aux_arrays(self, seed: int) -> dict[str, Any]:
        """The auxiliary heads' initial parameters (numpy), by array name."""
        return {
            f"{aux_key(m)}{n}": p.detach().cpu().numpy().copy()
            for m, head in self.heads.items()
            for n, p in head.state_dict().items()
        }


def build_cascade(
    model: nn.Module,
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    batch_size: int,
    budget: float,
    seed: int,
    optimizer_slots: int = 1,
) -> Cascade:
    """Atoms, greedy partition under ``budget`` bytes, names, seeded heads."""
    parts = atoms(model, input_shape)
    part = partition(
        parts,
        num_classes=num_classes,
        batch_size=batch_size,
        budget=budget,
        optimizer_slots=optimizer_slots,
    )
    name_of = {id(p): n for n, p in model.named_parameters()}
    names = [
        [name_of[id(p)] for i in module for p in parts[i].block.parameters()]
        for module in part.modules
    ]
    heads = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m, module in enumerate(part.modules[:-1]):
            heads[m] = aux_head(parts[module[-1]].out_shape, num_classes)
    return Cascade(parts, part, names, heads)


def cascade_for(experiment: Any, model: nn.Module, info: Any) -> Cascade:
    """The cascade of ``model`` under ``strategy.memory-mb`` (its smallest
    entry)."""
    return build_cascade(
        model,
        info.input_shape,
        info.num_classes,
        batch_size=experiment.train.batch_size,
        budget=min(experiment.strategy.options.memory_mb) * 1e6,
        seed=experiment.seed,
        optimizer_slots=int(experiment.train.momentum > 0),
    )


def check_budget(experiment: Any, model: nn.Module, data: Any) -> None:
    """Pre-run check: every budget goes to some client, and the model can be
    partitioned under the smallest."""
    check_per_client(
        "strategy.memory-mb",
        experiment.strategy.options.memory_mb,
        experiment.federation.clients,
    )
    cascade_for(experiment, model, data.info)
