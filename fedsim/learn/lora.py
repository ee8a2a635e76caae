"""LoRA vocabulary shared by the LoRA client algorithm and the LoRA strategies.

Names on the wire. A client's reply carries, for every adapted linear layer
``<module>`` (its name in the base model's ``named_modules()``), the arrays
``<module>.lora_A.weight`` (A, ``r x d_in``) and ``<module>.lora_B.weight`` (B,
``d_out x r``), and the fully trained modules under their state-dict names
(``head.weight``...). The server sends down base state-dict names. A and B are
always paired by name (:func:`lora_pairs`), never by shape.

Which client trains which rank: partition ``i`` gets ``peft.ranks[i %
len(peft.ranks)]`` when ``peft.ranks`` is set, else ``peft.rank``
(:func:`rank_for`); its ``lora_alpha`` is ``peft.alpha-per-rank * r`` when that is
set, else ``peft.alpha`` (:func:`alpha_for`), and its scaling ``lora_alpha / r``
(:func:`scaling_for`).

The name functions import neither torch nor PEFT (numpy only), so strategies
stay pure numpy; the functions that touch modules import them when called
(PEFT's import takes seconds).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fedsim.core.errors import ConfigError
from fedsim.core.experiment import PeftConfig
from fedsim.core.seeding import derive_seed

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from torch import nn

LORA_A = "lora_A"
LORA_B = "lora_B"
#: PEFT's name for the single adapter each client trains.
ADAPTER = "default"


def rank_for(peft: PeftConfig, partition_id: int) -> int:
    """LoRA rank of the client holding ``partition_id``."""
    if peft.ranks:
        return peft.ranks[partition_id % len(peft.ranks)]
    return peft.rank


def max_rank(peft: PeftConfig) -> int:
    """The largest rank any client trains."""
    return max(peft.ranks) if peft.ranks else peft.rank


def alpha_for(peft: PeftConfig, rank: int) -> float:
    """``lora_alpha`` of a rank-``rank`` client: ``peft.alpha-per-rank * r`` when
    set (the FLoRA reference's heterogeneous runs use ``2 r``), else
    ``peft.alpha``."""
    return peft.alpha_per_rank * rank if peft.alpha_per_rank > 0 else peft.alpha


def scaling_for(peft: PeftConfig, rank: int) -> float:
    """LoRA scaling ``lora_alpha / r`` (PEFT's default, not rsLoRA)."""
    return alpha_for(peft, rank) / rank


def matches(module_name: str, names: Iterable[str]) -> bool:
    """PEFT's rule: a module matches a name it equals or ends in as ``.name``."""
    return any(module_name == n or module_name.endswith(f".{n}") for n in names)


def lora_pairs(keys: Iterable[str]) -> dict[str, tuple[str, str]]:
    """Pair LoRA A and B arrays by name.

    A key holding the dotted component ``lora_A`` is an A; its B is the same key
    with that component replaced by ``lora_B`` (PEFT parameter names such as
    ``base_model.model.q_proj.lora_A.default.weight`` and the wire names above
    both work). Keys without either component are not LoRA arrays and are left
    out.

    Returns
    -------
    dict
        Adapted module name (the components before ``lora_A``) -> (A key, B key).

    Raises
    ------
    ValueError
        An A without its B, or a B without its A.
    """
    keys = list(keys)
    present = set(keys)
    pairs: dict[str, tuple[str, str]] = {}
    matched_b: set[str] = set()
    for key in keys:
        parts = key.split(".")
        if LORA_A not in parts:
            continue
        i = parts.index(LORA_A)
        b_key = ".".join([*parts[:i], LORA_B, *parts[i + 1 :]])
        if b_key not in present:
            raise ValueError(f"LoRA array {key!r} has no matching {b_key!r}")
        pairs[".".join(parts[:i])] = (key, b_key)
        matched_b.add(b_key)
    for key in keys:
        if LORA_B in key.split(".") and key not in matched_b:
            raise ValueError(f"LoRA array {key!r} has no matching lora_A array")
    return pairs


@dataclass(frozen=True)
class LoraLayout:
    """Which parts of a base model LoRA fine-tuning touches.

    Attributes
    ----------
    adapted : tuple of str
        Names of the linear modules that carry adapters.
    trained : tuple of str
        State-dict keys of the parameters trained in full (``modules-to-save``).
    transposed : tuple of str
        The adapted modules that store their weight ``d_in x d_out`` (GPT-2's
        ``Conv1D``, PEFT's ``fan_in_fan_out``): an update ``B @ A`` is added to
        their weight transposed.
    """

    adapted: tuple[str, ...]
    trained: tuple[str, ...]
    transposed: tuple[str, ...] = ()

    @property
    def adapted_weights(self) -> tuple[str, ...]:
        """State-dict keys of the weights that merged adapters change."""
        return tuple(f"{m}.weight" for m in self.adapted)

    @property
    def changing(self) -> tuple[str, ...]:
        """Every state-dict key federated LoRA fine-tuning can change; all other
        weights stay those of the initial base."""
        return self.adapted_weights + self.trained


def _adaptable(module: Any) -> bool:
    """Whether PEFT's LoRA adapts ``module`` here: ``nn.Linear`` or GPT-2's
    ``Conv1D`` (``fan_in_fan_out``)."""
    from torch import nn

    return isinstance(module, nn.Linear) or _conv1d(module)


def _conv1d(module: Any) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def _matching(modules: dict[str, Any], wanted: str, key: str) -> list[str]:
    """Names of ``modules`` that ``wanted`` matches; none is an error of ``key``
    naming a few names that would match."""
    found = [name for name in modules if name and matches(name, [wanted])]
    if not found:
        leaves = [n.rsplit(".", 1)[-1] for n, m in modules.items() if _adaptable(m)]
        some = list(dict.fromkeys(leaves))[:8]
        hint = f"; linear layers it has: {', '.join(some)}" if some else ""
        raise ConfigError(f"{key}: {wanted!r} matches no module of the model{hint}")
    return found


def lora_layout(model: nn.Module, peft: PeftConfig) -> LoraLayout:
    """Resolve ``peft.targets`` and ``peft.modules-to-save`` on ``model``.

    Raises
    ------
    ConfigError
        A name matches no module, a target is neither an ``nn.Linear`` nor a
        ``Conv1D``, or a module
        trained in full contains an adapted one.
    """
    modules = dict(model.named_modules())
    adapted: list[str] = []
    for target in peft.targets:
        found = _matching(modules, target, "peft.targets")
        for name in found:
            if not _adaptable(modules[name]):
                raise ConfigError(
                    f"peft.targets: {name!r} is a {type(modules[name]).__name__}; "
                    "LoRA here adapts nn.Linear and Conv1D layers only"
                )
            if name not in adapted:
                adapted.append(name)
    trained: list[str] = []
    for wanted in peft.modules_to_save:
        found = _matching(modules, wanted, "peft.modules-to-save")
        for name in found:
            inside = [a for a in adapted if a == name or a.startswith(f"{name}.")]
            if inside:
                raise ConfigError(
                    f"peft.modules-to-save: {wanted!r} contains the LoRA target "
                    f"{inside[0]!r}; a module is either adapted or trained in full"
                )
            for pname, _ in modules[name].named_parameters():
                key = f"{name}.{pname}"
                if key not in trained:
                    trained.append(key)
    transposed = tuple(a for a in adapted if _conv1d(modules[a]))
    return LoraLayout(tuple(adapted), tuple(trained), transposed)


def check_layout(experiment: Any, model: nn.Module, data: Any) -> None:
    """A LoRA family's pre-run check: ``peft.targets`` and ``peft.modules-to-save``
    resolve on the model (raises ConfigError naming the key)."""
    lora_layout(model, experiment.peft)


def inject_lora(
    model: nn.Module,
    peft: PeftConfig,
    layout: LoraLayout,
    *,
    rank: int,
    init_seed: int,
) -> PeftModel:
    """Wrap ``model`` in place with fresh rank-``rank`` LoRA adapters (PEFT).

    B starts at zero, as in PEFT. A is drawn from PEFT's default distribution
    (Kaiming-uniform, bound ``1 / sqrt(d_in)``) by a generator seeded with
    ``init_seed`` and the module name: every client given the same ``init_seed``
    starts from the same A, and a rank-``r`` client's A is the first ``r`` rows
    of the rank-``max_rank`` one, so zero-padded averaging (FedIT) aligns rows
    that began equal. Only the adapters are trainable; ``model.unload()`` on the
    returned wrapper restores the plain module.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha_for(peft, rank),  # type: ignore[arg-type]  # any number
        lora_dropout=peft.dropout,
        target_modules=list(layout.adapted),
        bias="none",
        fan_in_fan_out=bool(layout.transposed),
    )
    wrapped = get_peft_model(model, config)
    with torch.no_grad():
        for name in layout.adapted:
            layer: Any = model.get_submodule(name)
            weight = layer.lora_A[ADAPTER].weight
            weight.copy_(initial_a(peft, name, weight.shape[1], rank, init_seed))
    return wrapped


def initial_a(
    peft: PeftConfig, module: str, d_in: int, rank: int, init_seed: int
) -> torch.Tensor:
    """The A factor a rank-``rank`` client starts module ``module`` with:
    Kaiming-uniform (bound ``1 / sqrt(d_in)``) from a generator seeded with
    ``init_seed`` and the module name, the first ``rank`` rows of the
    largest rank's draw (see :func:`inject_lora`)."""
    import torch

    generator = torch.Generator().manual_seed(derive_seed(init_seed, module))
    bound = 1.0 / math.sqrt(d_in)
    full = torch.empty(max_rank(peft), d_in).uniform_(
        -bound, bound, generator=generator
    )
    return full[:rank]


def client_adapters(
    shared: Mapping[str, np.ndarray], *, rank: int, scaling: float
) -> dict[str, np.ndarray]:
    """What a client of rank ``rank`` and scaling ``scaling`` continues from:
    the first ``rank`` rows of each global A and columns of each global B, B
    divided by the scaling, so that the client's ``scaling * B A`` is the
    global adapters' ``B[:, :r] A[:r]`` (HetLoRA-style truncation for lower
    ranks, the identity for the largest)."""
    out: dict[str, np.ndarray] = {}
    for a_key, b_key in lora_pairs(shared).values():
        out[a_key] = np.asarray(shared[a_key])[:rank]
        out[b_key] = np.asarray(shared[b_key])[:, :rank] / scaling
    return out


def adapter_state(model: nn.Module, layout: LoraLayout) -> dict[str, torch.Tensor]:
    """The adapters of a model wrapped by :func:`inject_lora`, under wire names
    (CPU copies)."""
    out: dict[str, torch.Tensor] = {}
    for name in layout.adapted:
        layer: Any = model.get_submodule(name)
        out[f"{name}.{LORA_A}.weight"] = layer.lora_A[ADAPTER].weight.detach().cpu()
        out[f"{name}.{LORA_B}.weight"] = layer.lora_B[ADAPTER].weight.detach().cpu()
    return out
