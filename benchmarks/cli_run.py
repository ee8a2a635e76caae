"""Shared by the benchmarks: run ``fedsim run`` as a user would; print tables."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path


def fedsim_run(
    experiment: Path | None, overrides: Sequence[str], out: Path
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Run the CLI; return the finished process and the run directory it made."""
    out.mkdir(parents=True, exist_ok=True)
    before = set(out.iterdir())
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedsim",
            "run",
            *([str(experiment)] if experiment else []),
            *[arg for pair in overrides for arg in ("--set", pair)],
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    made = [p for p in set(out.iterdir()) - before if p.is_dir()]
    if len(made) != 1:
        raise RuntimeError(f"fedsim run made no run directory:\n{proc.stderr}")
    return proc, made[0]


def markdown(rows: list[dict[str, str]], text_columns: tuple[str, ...]) -> str:
    """A Markdown table of ``rows``: ``text_columns`` left-aligned, numbers right."""
    columns = list(rows[0])
    align = ["---" if c in text_columns else "---:" for c in columns]
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(r[c] for c in columns) + " |" for r in rows]
    return "\n".join(lines)
