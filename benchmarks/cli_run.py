"""Shared by the benchmarks: run ``fedsim run`` as a user would; print tables."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path


def fedsim_command(
    experiment: Path | None, overrides: Sequence[str], out: Path
) -> list[str]:
    """The ``fedsim run`` command line: ``experiment`` (if any), one ``--set`` per
    override, ``--out``."""
    return [
        sys.executable,
        "-m",
        "fedsim",
        "run",
        *([str(experiment)] if experiment else []),
        *[arg for pair in overrides for arg in ("--set", pair)],
        "--out",
        str(out),
    ]


def fedsim_run(
    experiment: Path | None, overrides: Sequence[str], out: Path
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Run the CLI; return the finished process and the run directory it made."""
    out.mkdir(parents=True, exist_ok=True)
    before = set(out.iterdir())
    proc = subprocess.run(
        fedsim_command(experiment, overrides, out), capture_output=True, text=True
    )
    made = [p for p in set(out.iterdir()) - before if p.is_dir()]
    if len(made) != 1:
        raise RuntimeError(f"fedsim run made no run directory:\n{proc.stderr}")
    return proc, made[0]


def run(experiment: Path, overrides: Sequence[str], out: Path) -> Path:
    """``fedsim run EXPERIMENT``; the new run directory (a failed run raises,
    with its output)."""
    proc, run_dir = fedsim_run(experiment, overrides, out)
    if proc.returncode != 0:
        raise RuntimeError(f"{experiment} failed:\n{proc.stdout}\n{proc.stderr}")
    return run_dir


def table_parser(doc: str, out: str) -> argparse.ArgumentParser:
    """The table scripts' options: ``--out`` (default ``out``), ``--set KEY=VALUE``
    (repeatable) and ``--read RUN_DIR ...`` (tabulate these, run nothing);
    described by the first line of ``doc``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(out))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument(
        "--read", nargs="*", type=Path, help="tabulate these run directories only"
    )
    return parser


def markdown(rows: list[dict[str, str]], text_columns: tuple[str, ...]) -> str:
    """A Markdown table of ``rows``: ``text_columns`` left-aligned, numbers right."""
    columns = list(rows[0])
    align = ["---" if c in text_columns else "---:" for c in columns]
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(r[c] for c in columns) + " |" for r in rows]
    return "\n".join(lines)
