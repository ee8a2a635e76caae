"""Cutting the packaged models into segments, for split learning.

A model is a sequence of named *stages* (:func:`stages`), each a function of the
previous stage's output whose parameters are the model's own, under the model's
own state-dict names:

- ``mlp``: ``body.0`` (flatten) ... ``body.5``, ``head``;
- ``cnn``: ``features.0`` ... ``features.5`` (the last one flattens), ``fc.0``,
  ``fc.1``, ``fc.2``, ``head``;
- ``vit``: ``embed`` (patch, class and positional embeddings), ``blocks.0`` ...
  ``blocks.<depth-1>``, ``pool`` (final LayerNorm of the class token), ``head``.

Hugging Face models (``model.name = "hf"``) are cut at their blocks
(:mod:`fedsim.learn.hf_split`: ``model.layers.1``, ``transformer.h.1``...); a
stage there passes a :class:`fedsim.learn.hf_split.Carry` (hidden states and
padding mask) to the next, and :func:`cut_tensor` / :func:`cut_context` /
:func:`join` say what crosses a cut.

A cut names the last stage before it (or gives that stage's index in the list).
:func:`split_model` cuts a model at one or more cuts into :class:`Segment` s
that share the model's modules: ``segments[0](x)`` feeds ``segments[1]``, and so
on, and running them in order is the unsplit model's forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import nn

from fedsim.core.errors import ConfigError
from fedsim.core.messages import CONTEXT
from fedsim.learn import hf_split
from fedsim.learn.hf_split import cut_context as cut_context
from fedsim.learn.hf_split import cut_tensor as cut_tensor
from fedsim.learn.hf_split import join as join
from fedsim.learn.models import CNN, MLP, ViT

#: ``(name, forward, parameter prefixes)`` of one stage.
Stage = tuple[str, Callable[[Any], Any], tuple[str, ...]]

#: Where each packaged model is cut when ``split.cut`` is empty.
DEFAULT_CUT = {MLP: "body.2", CNN: "features.4", ViT: "blocks.0"}


def _sequential(model: nn.Module, names: Sequence[str]) -> list[Stage]:
    out: list[Stage] = []
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, nn.Sequential):
            out += [(f"{name}.{i}", m, (f"{name}.{i}.",)) for i, m in enumerate(module)]
        else:
            out.append((name, module, (f"{name}.",)))
    return out


def stages(model: nn.Module) -> list[Stage]:
    """The stages of a packaged model, in forward order.

    Raises
    ------
    ConfigError
        For a model that split learning cannot cut.
    """
    if hf_split.is_hf(model):
        return hf_split.stages(model)  # type: ignore[arg-type]
    if isinstance(model, MLP):
        return _sequential(model, ["body", "head"])
    if isinstance(model, CNN):
        return _sequential(model, ["features", "fc", "head"])
    if isinstance(model, ViT):
        embed: Stage = (
            "embed",
            model.embed,
            ("patch_embed.", "cls_token.", "pos_embed.", "prompts"),
        )
        blocks: list[Stage] = [
            (f"blocks.{i}", b, (f"blocks.{i}.",)) for i, b in enumerate(model.blocks)
        ]
        tail: list[Stage] = [
            ("pool", model.pool, ("norm.",)),
            ("head", model.head, ("head.",)),
        ]
        return [embed, *blocks, *tail]
    raise ConfigError(
        f"model.name: split learning cuts the packaged 'mlp', 'cnn' and 'vit' and "
        f"'hf' transformers, not {type(model).__name__}"
    )


def stage_names(model: nn.Module) -> list[str]:
    """The names a cut may take for ``model``."""
    return [name for name, _, _ in stages(model)]


def cut_index(model: nn.Module, cut: str, key: str = "split.cut") -> int:
    """Index of the last stage before ``cut`` (a stage name or its index; empty:
    the model's default cut). ``key`` names the config key in errors."""
    names = stage_names(model)
    hf = hf_split.is_hf(model)
    if not cut:
        cut = hf_split.default_cut(names) if hf else DEFAULT_CUT[type(model)]
    if cut.isdigit() and int(cut) < len(names):
        return int(cut)
    if cut in names:
        return names.index(cut)
    if hf and cut == "head":  # the output layer of every architecture
        return len(names) - 1
    shown = names if len(names) <= 8 else [*names[:4], "...", *names[-3:]]
    raise ConfigError(
        f"{key}: {cut!r} is not a stage of this model; use one of "
        f"{', '.join(shown)} (or its index)"
    )


def cut_points(model: nn.Module, cut: str, tail: str | None = None) -> list[int]:
    """Stage indices after which ``model`` is cut: after ``cut`` (``split.cut``),
    and with ``tail`` (``split.tail``, U-shaped) before that stage too.

    Raises
    ------
    ConfigError
        If a cut is not a stage, or leaves the server no stage.
    """
    first = cut_index(model, cut)
    names = stage_names(model)
    if tail is None:
        if first >= len(names) - 1:
            raise ConfigError(
                f"split.cut: {cut!r} leaves the server no stage; cut before "
                f"{names[-1]!r}"
            )
        return [first]
    start = cut_index(model, tail, "split.tail")
    if start <= first + 1:
        raise ConfigError(
            f"split.tail: {tail!r} must start at least two stages after split.cut "
            f"({names[first]!r}) so that the server holds a body"
        )
    return [first, start - 1]


class Segment:
    """Consecutive stages of a model: callable, with its parameters and state
    under the model's state-dict names.

    Parameters
    ----------
    model : nn.Module
        The model whose modules the segment runs (shared, not copied).
    stages : sequence of Stage
        The segment's stages, in forward order.
    carried : frozenset of str, optional
        The state-dict names its weights carry (``state`` / ``load``); None:
        all it owns (LoRA: only the trainable ones,
        :func:`fedsim.learn.hf_split.carried`).
    """

    def __init__(
        self,
        model: nn.Module,
        stages: Sequence[Stage],
        carried: frozenset[str] | None = None,
    ):
        self.model = model
        self.stages = tuple(stages)
        self.prefixes = tuple(p for _, _, prefixes in self.stages for p in prefixes)
        self.carried = carried

    def __call__(self, x: Any) -> Any:
        for _, forward, _ in self.stages:
            x = forward(x)
        return x

    @property
    def names(self) -> list[str]:
        """Names of the stages."""
        return [name for name, _, _ in self.stages]

    def owns(self, key: str) -> bool:
        """Whether state-dict entry ``key`` belongs to this segment."""
        return key.startswith(self.prefixes)

    def parameters(self) -> list[nn.Parameter]:
        """The segment's trainable parameters, in the model's order."""
        return [
            p
            for n, p in self.model.named_parameters()
            if self.owns(n) and p.requires_grad
        ]

    def _entries(self) -> dict[str, torch.Tensor]:
        return {
            k: v
            for k, v in self.model.state_dict().items()
            if self.owns(k) and (self.carried is None or k in self.carried)
        }

    def state(self) -> dict[str, torch.Tensor]:
        """The segment's state-dict entries it carries (CPU copies)."""
        return {k: v.detach().cpu().clone() for k, v in self._entries().items()}

    def load(self, arrays: Mapping[str, torch.Tensor | np.ndarray]) -> None:
        """Copy ``arrays`` (exactly this segment's carried entries) into the
        model."""
        own = self._entries()
        if set(arrays) != set(own):
            missing = sorted(set(own) ^ set(arrays))
            raise ValueError(f"segment arrays differ from the segment's: {missing[:3]}")
        with torch.no_grad():
            for k, v in arrays.items():
                own[k].copy_(torch.as_tensor(v))


def split_model(model: nn.Module, cuts: Sequence[int]) -> list[Segment]:
    """Cut ``model`` after each stage index in ``cuts`` (increasing): ``len(cuts)
    + 1`` segments sharing the model's modules.

    Raises
    ------
    ValueError
        If the cuts are not increasing or leave a segment empty.
    """
    all_stages = stages(model)
    bounds = [-1, *cuts, len(all_stages) - 1]
    if any(b <= a for a, b in zip(bounds, bounds[1:], strict=False)):
        raise ValueError(f"cuts {list(cuts)} leave an empty segment")
    carried = hf_split.carried(model)
    return [
        Segment(model, all_stages[a + 1 : b + 1], carried)
        for a, b in zip(bounds, bounds[1:], strict=False)
    ]


def batch_plan(n: int, batch_size: int, epochs: int, *, seed: int) -> list[np.ndarray]:
    """The example indices of every batch of ``epochs`` shuffled passes over
    ``n`` examples (a fresh permutation per epoch, from ``seed`` alone)."""
    generator = torch.Generator().manual_seed(seed)
    plan: list[np.ndarray] = []
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator).numpy()
        plan += [order[i : i + batch_size] for i in range(0, n, batch_size)]
    return plan


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run the block with torch's generators (CPU and ``device``'s) at ``seed``
    and restore them after: a forward pass recomputed under the same seed draws
    the same dropout masks.

    The CPU generator is seeded directly (``torch.manual_seed`` also seeds every
    lazily initialised accelerator backend, which costs milliseconds per call,
    once per batch here).
    """
    if device.type == "cuda":
        with torch.random.fork_rng(devices=[device.index or 0]):
            torch.manual_seed(seed)
            yield
        return
    saved = torch.default_generator.get_state()
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        torch.default_generator.set_state(saved)


def context_arrays(value: Any) -> dict[str, np.ndarray]:
    """The arrays that travel beside a cut value's tensor, named
    ``context.<name>`` (:func:`cut_context`)."""
    return {f"{CONTEXT}.{k}": v for k, v in cut_context(value).items()}


def received(cut: Mapping[str, np.ndarray], tensor: torch.Tensor) -> Any:
    """A received cut tensor with the ``context.*`` arrays of its message, as
    the next stage takes it (:func:`join`)."""
    prefix = f"{CONTEXT}."
    context = {k[len(prefix) :]: v for k, v in cut.items() if k.startswith(prefix)}
    return join(tensor, context)


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Numpy arrays as an ArrayRecord (what a message carries)."""
    return ArrayRecord(
        array_dict={k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}
    )


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """An ArrayRecord's arrays as numpy arrays."""
    return {k: v.numpy() for k, v in record.items()}


def optimizer_arrays(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimiser's per-parameter state (momentum buffers, Adam's moments and
    step) as named tensors, ``<parameter index>.<name>``."""
    out = {}
    for index, entry in optimizer.state_dict()["state"].items():
        for name, value in entry.items():
            out[f"{index}.{name}"] = torch.as_tensor(value).detach().cpu().clone()
    return out


def load_optimizer(
    optimizer: torch.optim.Optimizer, arrays: Mapping[str, torch.Tensor]
) -> None:
    """Restore the per-parameter state saved by :func:`optimizer_arrays`."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in arrays.items():
        index, _, name = key.partition(".")
        state.setdefault(int(index), {})[name] = torch.as_tensor(value)
    full = optimizer.state_dict()
    full["state"] = state
    optimizer.load_state_dict(full)
