"""Run ``fedsim run`` in a subprocess, as a user would; shared by the benchmarks."""

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
