"""The architecture holds: layers import only downwards, no import cycles,
small modules, and nothing outside a family compares strategy names."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("fedsim", "strategies", "clients")
#: Folders of the checkout installed under another import name (pyproject's
#: ``[tool.setuptools.package-dir]``).
INSTALLED_AS = {"strategies": "fedsim.strategies", "clients": "fedsim.clients"}
#: Which fedsim layers each layer may import (besides itself).
ALLOWED = {
    "core": set(),
    # the one importer of Flower's private API (tests/test_flwr_private.py)
    "flwr_private": {"core"},
    "learn": {"core", "flwr_private"},
    "protocol": {"core", "learn", "flwr_private"},
    "privacy": {"core", "learn", "protocol", "flwr_private"},
    "analysis": {"core"},
    "audit": {"core", "learn", "flwr_private"},
    # the engine by the process each part runs in: the Ray actors' ClientApp,
    # the simulation process's ServerApp (it relays the clients' state), the
    # host the user starts (it reads what the ServerApp writes: run directory,
    # resume checkpoint)
    "engine.client": {"core", "learn", "protocol", "privacy", "flwr_private"},
    "engine.server": {
        "core", "learn", "protocol", "privacy", "analysis", "audit", "flwr_private",
        "engine.client",
    },
    "engine.host": {
        "core", "learn", "protocol", "privacy", "analysis", "audit", "flwr_private",
        "engine.client", "engine.server",
    },
}
MAX_LINES = 450


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            if package in INSTALLED_AS:
                name = INSTALLED_AS[package] + name[len(package) :]
            out[name] = path
    return out


def imports(path: Path, name: str, known: dict[str, Path]) -> set[str]:
    """Modules of this repository that ``path`` imports, anywhere in it."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    # a module's PEP 562 ``__getattr__`` imports on first attribute access, after
    # the module is whole: not an import-time edge
    tree.body = [
        n
        for n in tree.body
        if not (isinstance(n, ast.FunctionDef) and n.name == "__getattr__")
    ]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            # ``from pkg import module`` imports the module; ``from module
            # import name`` the module itself
            subs = [f"{base}.{alias.name}" for alias in node.names]
            targets = [t for t in subs if t in known] or [base]
        else:
            continue
        found.update(t for t in targets if t in known)
    found.discard(name)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, name, known) for name, path in known.items()}


def layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "fedsim" or len(parts) < 2:
        return None
    if parts[1] == "engine" and len(parts) > 2:
        return f"engine.{parts[2]}"
    return parts[1]


def test_no_import_cycle() -> None:
    edges = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_layers_import_only_downwards() -> None:
    bad = []
    for module, targets in graph().items():
        own = layer(module)
        for target in targets:
            strategies, clients = INSTALLED_AS["strategies"], INSTALLED_AS["clients"]
            if module.startswith(strategies) and target.startswith(clients):
                bad.append(f"{module} -> {target}")
            if module.startswith(clients) and target.startswith(strategies):
                bad.append(f"{module} -> {target}")
            other = layer(target)
            if own in ALLOWED and other in ALLOWED and other != own:
                if other not in ALLOWED[own]:
                    bad.append(f"{module} -> {target}")
    assert not bad, bad


def test_core_imports_neither_torch_nor_flower() -> None:
    for path in (ROOT / "fedsim" / "core").glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for n in names:
                assert n.split(".")[0] not in ("torch", "flwr", "ray"), (path, n)


def test_modules_stay_small() -> None:
    big = {
        str(path.relative_to(ROOT)): n
        for path in modules().values()
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not big, big


def test_nothing_outside_a_family_compares_strategy_names() -> None:
    names = "|".join(["fedavg", "flora", "fedit"])
    pattern = re.compile(rf"[=!]=\s*[\"']({names})[\"']|[\"']({names})[\"']\s*[=!]=")
    hits = [
        f"{path.relative_to(ROOT)}:{i}"
        for package in ("fedsim", "clients")
        for path in (ROOT / package).rglob("*.py")
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if pattern.search(line) or re.search(rf"\bin\s*\(\s*[\"']({names})", line)
    ]
    assert not hits, hits


def test_nothing_imports_the_checkout_folders_by_their_folder_names() -> None:
    """``strategies`` / ``clients`` are importable only as ``fedsim.strategies`` /
    ``fedsim.clients`` once installed: a bare import works in the checkout only."""
    bare = re.compile(r"^\s*(from|import)\s+(strategies|clients)\b", re.M)
    text = re.compile(r"[\"'](strategies|clients)\.[a-z_]+[.:]")
    hits = [
        str(path.relative_to(ROOT))
        for folder in (*PACKAGES, "tests", "benchmarks")
        for path in (ROOT / folder).rglob("*.py")
        if bare.search(src := path.read_text(encoding="utf-8")) or text.search(src)
    ]
    assert not hits, hits


def test_every_package_folder_is_installed() -> None:
    """pyproject lists packages by hand (package-dir maps two folders): a new
    family's folder must be in that list or an installed fedsim lacks it."""
    import tomllib

    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
            "packages"
        ]
    )
    found = {
        name
        for name, path in modules().items()
        if path.name == "__init__.py"
    }
    assert found == listed, (found - listed, listed - found)


def test_installed_fedsim_adds_no_top_level_strategies_or_clients(tmp_path) -> None:
    """Outside the checkout, the installed names are fedsim's own."""
    import subprocess
    import sys

    code = (
        "import importlib.util as u, fedsim.strategies.fedavg, fedsim.clients.full;"
        "print(u.find_spec('strategies'), u.find_spec('clients'))"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", code],
        cwd=tmp_path, capture_output=True, text=True, check=True,
    ).stdout.split()
    assert out == ["None", "None"], out


def test_the_engine_is_grouped_by_the_process_each_part_runs_in() -> None:
    """Every engine module lies in ``host``, ``server`` or ``client``."""
    loose = [
        name
        for name in modules()
        if name.startswith("fedsim.engine.")
        and layer(name) not in ("engine.host", "engine.server", "engine.client")
    ]
    assert not loose, loose
