"""Flower's private API stays behind ``fedsim.flwr_private``: nothing else
imports it, the private functions it relies on still have the parameters it
expects, and a patch skipped on another Flower version says so once."""

from __future__ import annotations

import ast
import importlib
import inspect
import warnings
from pathlib import Path

import pytest

from fedsim.flwr_private import arrays, linkstate, ray_backend, signatures, vce, version

ROOT = Path(__file__).resolve().parent.parent
FENCE = ROOT / "fedsim" / "flwr_private"
#: Flower's public API, as its API reference documents it: these modules and
#: the names in their ``__all__``.
PUBLIC = (
    "flwr",
    "flwr.app",
    "flwr.serverapp",
    "flwr.serverapp.strategy",
    "flwr.clientapp",
    "flwr.clientapp.mod",
    "flwr.simulation",
)


def sources() -> list[Path]:
    """fedsim's modules outside the fence, the families, the benchmarks."""
    return [
        path
        for folder in ("fedsim", "strategies", "clients", "benchmarks")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if FENCE not in path.parents
    ]


def private_methods() -> set[str]:
    """The private (single-underscore) names of Flower's public strategy
    classes: calling one is using Flower's private API too."""
    import flwr.serverapp.strategy as strategies

    return {
        name
        for cls in vars(strategies).values()
        if inspect.isclass(cls)
        for name in dir(cls)
        if name.startswith("_") and not name.startswith("__")
    } - {"_abc_impl"}


def private_uses(path: Path, methods: set[str], root: Path = ROOT) -> list[str]:
    """What ``path`` uses of Flower beyond its public API."""
    found = []
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if top == "flwr" and alias.name not in PUBLIC:
                    found.append(f"import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and not node.level:
            module = node.module or ""
            if module.split(".")[0] != "flwr":
                continue
            if module not in PUBLIC:
                found.append(f"from {module} import ...")
                continue
            public = set(importlib.import_module(module).__all__)
            found += [
                f"from {module} import {a.name}"
                for a in node.names
                if a.name not in public and f"{module}.{a.name}" not in PUBLIC
            ]
        elif isinstance(node, ast.Attribute) and node.attr in methods:
            found.append(f".{node.attr}")
    return [f"{path.relative_to(root)}:{use}" for use in found]


def test_only_the_fence_imports_flowers_private_api():
    methods = private_methods()
    assert "_check_and_log_replies" in methods  # the scan sees what it must
    hits = [use for path in sources() for use in private_uses(path, methods)]
    assert not hits, hits


def test_the_scan_catches_a_private_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from flwr.common.serde import recorddict_to_proto\n"
        "import flwr.server.superlink\n"
        "from flwr.app import Message, _private\n"
        "from flwr.serverapp.strategy import FedAvg\n"
        "FedAvg._check_and_log_replies\n"
    )
    found = private_uses(bad, private_methods(), root=tmp_path)
    uses = [u.split(":", 1)[1] for u in found]
    assert uses == [
        "from flwr.common.serde import ...",
        "import flwr.server.superlink",
        "from flwr.app import _private",
        "._check_and_log_replies",
    ]


def resolve(path: str) -> object:
    """The object a dotted path names (the longest importable module first)."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
            break
        except ImportError:
            continue
    for name in parts[cut:]:
        obj = getattr(obj, name)
    return obj


def flowers_own(path: str) -> object:
    """What Flower defines at ``path``, whether or not a patch replaced it in
    this process (the patches keep Flower's originals)."""
    obj = resolve(path)
    if getattr(obj, "__module__", "").startswith("fedsim"):
        name = path.rpartition(".")[2]
        obj = {"numpy": arrays.FLOWERS_NUMPY, **linkstate.original}[name]
    assert not getattr(obj, "__module__", "").startswith("fedsim"), path
    return obj


def test_flowers_private_functions_have_the_parameters_the_fence_expects():
    """Each private function or method the fence calls or replaces, as the
    installed Flower defines it, has the parameters the fence's ``PATCHED``
    tables name."""
    expected = signatures.contract()
    assert len(expected) >= 15
    found = {
        path: tuple(
            p
            for p in inspect.signature(flowers_own(path)).parameters
            if not p.startswith("_ray")
        )
        for path in expected
    }
    wrong = {p: (found[p], want) for p, want in expected.items() if found[p] != want}
    assert not wrong, wrong


def test_a_patch_skipped_on_another_flower_warns_once(monkeypatch):
    import flwr
    from flwr.app import Array
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.linkstate import in_memory_linkstate as memory

    monkeypatch.setattr(flwr, "__version__", "1.42.0")
    monkeypatch.setattr(version, "_warned", set())
    before = (
        Array.numpy,
        vce_api.worker,
        memory.InMemoryLinkState.store_message_res,
        ray_backend.ray_backend().init_ray,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            assert not linkstate.install()
            assert not arrays.install()
            assert not vce.install()
            assert not ray_backend.add_init_args(dict)
    after = (
        Array.numpy,
        vce_api.worker,
        memory.InMemoryLinkState.store_message_res,
        ray_backend.ray_backend().init_ray,
    )
    assert after == before  # nothing replaced
    messages = [str(w.message) for w in caught]
    assert all(w.category is version.UnsupportedFlowerWarning for w in caught)
    assert len(messages) == 4, messages  # one per patch, not per call
    for patch in ("linkstate", "arrays", "vce", "ray-init-args"):
        (line,) = [m for m in messages if f"patch {patch!r}" in m]
        assert "Flower 1.42.0" in line and "1.41.x" in line


def test_the_supported_flower_patches_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert version.supported()
        assert version.patchable("linkstate", "nothing")


@pytest.mark.parametrize("given", ["1.41.0", "1.41.3"])
def test_supported_versions(given):
    assert version.supported(given)
    assert not version.supported("1.4.1") and not version.supported("2.41.0")
