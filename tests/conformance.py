"""What the conformance suite (tests/test_conformance.py) runs for each family:
found in the registry, never in a hand-kept list.

A family's experiment is its packaged one (``experiments/*.toml`` whose
``strategy.name`` is the family; one without ``[audit]`` or ``[privacy]``
preferred, then the first by file name), or the quickstart with
``strategy.name`` set for a family without one (the test plug-ins), shrunk by
engine keys only (:func:`shrink`): two rounds, one local epoch of batches of 64,
a model 32 wide at most (Pa3dFL with its rank 16 diverges to NaN on a 16-wide
one), two PGD steps, a one-epoch pre-training, and as many clients as the
family's longest per-client list option (at least two).
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from fedsim.core import registry
from fedsim.core.experiment import Experiment
from fedsim.core.loading import load_experiment
from fedsim.core.schema import declared
from tests.runs import PLUGIN, SPY

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = ROOT / "experiments"
#: Where the test plug-ins live (their dist-info registers their families).
PLUGINS = (PLUGIN, SPY)


@contextmanager
def plugins(monkeypatch: pytest.MonkeyPatch | None = None) -> Iterator[None]:
    """The test plug-ins importable and the families discovered afresh; both
    undone afterwards (other tests see the installed families only)."""
    with pytest.MonkeyPatch.context() as patch:
        for folder in PLUGINS:
            (monkeypatch or patch).syspath_prepend(str(folder))
        registry.families.cache_clear()
        try:
            yield
        finally:
            registry.families.cache_clear()


def family_names() -> list[str]:
    """Every registered family, the test plug-ins included."""
    with plugins():
        return sorted(registry.families())


def packaged(name: str) -> Path | None:
    """The family's packaged experiment, if it has one."""
    found = []
    for path in sorted(EXPERIMENTS.glob("*.toml")):
        table = tomllib.loads(path.read_text("utf-8"))
        if table.get("strategy", {}).get("name") == name:
            found.append((("audit" in table) + ("privacy" in table), path.name, path))
    return min(found)[2] if found else None


def per_client_lists(exp: Experiment) -> int:
    """The longest list among the family's options and ``peft.ranks``."""
    options = exp.strategy.options
    lengths = [len(exp.peft.ranks)]
    if dataclasses.is_dataclass(options):
        lengths += [
            len(getattr(options, f.name))
            for f in dataclasses.fields(options)
            if isinstance(getattr(options, f.name), tuple)
        ]
    return max(lengths)


def shrink(exp: Experiment) -> list[str]:
    """Overrides of engine keys that make ``exp`` a small, quick run."""
    out = [
        "rounds=2",
        f"federation.clients={max(2, per_client_lists(exp))}",
        "train.epochs=1",
        f"train.batch-size={max(exp.train.batch_size, 64)}",
        f"model.hidden={min(exp.model.hidden, 32)}",
    ]
    if exp.model.name == "vit":
        out += ["model.heads=2", "model.patch-size=4"]
    if exp.model.pretrain:
        out.append("model.pretrain-epochs=1")
    if exp.robust.epsilon > 0:
        out.append(f"robust.steps={min(exp.robust.steps, 2)}")
    if exp.data.dataset == "synthetic":
        out.append(f"data.size={min(exp.data.size, 300)}")
    return out


def conformance_experiment(name: str) -> tuple[str | None, list[str]]:
    """The family's experiment file (None: the quickstart) and the overrides
    that select the family and shrink the run."""
    path = packaged(name)
    select = [] if path else [f"strategy.name={name}"]
    exp = load_experiment(path, select)
    return (str(path) if path else None), [*select, *shrink(exp)]


# -- bad values of a family's options ---------------------------------------------
_NUMBERS = (-1, 0, 10**9, 0.5, 1.5)


def bad_values(exp: Experiment) -> dict[str, Any]:
    """For each of the family's own keys (``<section>.<key>``), a value it must
    refuse: one its check rejects where a check and a value of the right type
    that fails it are at hand, else one of the wrong type."""
    family = registry.family(exp.strategy.name)
    options = family.options
    if not dataclasses.is_dataclass(options):
        return {}
    hints = typing.get_type_hints(options)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(options):
        if not declared(f):
            continue
        key = f"{family.section}.{f.name.replace('_', '-')}"
        tp, check = hints[f.name], f.metadata.get("check")
        out[key] = _wrong_type(tp)
        if check is None:
            continue
        if tp in (int, float):
            candidates: tuple[Any, ...] = tuple(
                v for v in _NUMBERS if tp is float or isinstance(v, int)
            )
        elif tp is str:
            candidates = ("no-such-value",)
        else:
            candidates = ()
        for value in candidates:
            if check(value):
                out[key] = value
                break
    return out


def _wrong_type(tp: Any) -> Any:
    if typing.get_origin(tp) is tuple or tp in (int, float, bool):
        return "wrong-type"
    return 3  # a str key
