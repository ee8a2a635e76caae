"""Regenerate what is derived from the config schema: the experiment-file
reference in README.md and the ``[tool.flwr.app.config]`` table of pyproject.toml
(the packaged quickstart, flattened, so that ``flwr run .`` runs the same apps).

Usage: ``python -m fedsim.docs`` from the repository root. ``tests/test_docs.py``
fails when either file and the code disagree.
"""

from __future__ import annotations

import sys
from pathlib import Path

import tomli_w

from fedsim.core.loading import (
    RUN_DIR_KEY,
    load_experiment,
    reference_markdown,
    to_run_config,
)

START, END = "<!-- keys:start -->", "<!-- keys:end -->"
FLWR_CONFIG = "[tool.flwr.app.config]"


def flower_config() -> dict[str, bool | int | float | str]:
    """Run-config defaults of the Flower App: the quickstart plus ``run-dir``."""
    return {**to_run_config(load_experiment(None)), RUN_DIR_KEY: ""}


def with_flower_config(pyproject: str) -> str:
    """``pyproject`` with its final ``[tool.flwr.app.config]`` table regenerated."""
    head, sep, _ = pyproject.partition(FLWR_CONFIG)
    if not sep:
        raise ValueError(f"pyproject.toml has no {FLWR_CONFIG} table")
    table = tomli_w.dumps({"tool": {"flwr": {"app": {"config": flower_config()}}}})
    return head + table


def with_reference(text: str) -> str:
    """``text`` with the block between the markers replaced by the reference."""
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    return f"{head}{START}\n{reference_markdown()}{END}{tail}"


def main(argv: list[str]) -> int:
    root = Path(argv[0] if argv else ".")
    readme, pyproject = root / "README.md", root / "pyproject.toml"
    text = readme.read_text(encoding="utf-8")
    if START not in text or END not in text:
        print(f"{readme}: markers {START} / {END} not found", file=sys.stderr)
        return 2
    readme.write_text(with_reference(text), encoding="utf-8")
    pyproject.write_text(
        with_flower_config(pyproject.read_text(encoding="utf-8")), encoding="utf-8"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
