"""Shared by the results tables: one ``fedsim sweep`` over seeds x variants, and
mean ± std per variant.

A table is a base experiment file, a list of variants (override tables, each
with its own ``name``) and the seeds. :func:`sweep_runs` writes the sweep file
(the base's tables, ``[grid] seed = [...]``, one ``[[variants]]`` each), runs
``fedsim sweep`` as a user would and returns every run directory under its
variant's name. :func:`mean_std` and :func:`separated` are what a README
sentence may claim: a difference only where the mean ± std intervals do not
overlap.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tomli_w

ROOT = Path(__file__).resolve().parents[1]


def sweep_file(
    base: Path | Mapping[str, Any],
    variants: Sequence[Mapping[str, Any]],
    seeds: Sequence[int],
    path: Path,
) -> Path:
    """Write the sweep of ``base`` (an experiment file or its parsed tables)
    over ``seeds`` x ``variants`` to ``path``."""
    table = dict(base) if isinstance(base, Mapping) else tomllib.loads(base.read_text())
    table["grid"] = {"seed": list(seeds)}
    table["variants"] = [dict(v) for v in variants]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(table))
    return path


def sweep_runs(
    base: Path | Mapping[str, Any],
    variants: Sequence[Mapping[str, Any]],
    seeds: Sequence[int],
    out: Path,
    *,
    name: str,
    overrides: Sequence[str] = (),
) -> dict[str, list[Path]]:
    """Run the sweep (``out/<name>.toml`` into ``out/<name>/``); the completed
    run directories per variant ``name``, in seed order. A failed experiment
    raises with the sweep's output."""
    path = sweep_file(base, variants, seeds, out / f"{name}.toml")
    command = [sys.executable, "-m", "fedsim", "sweep", str(path), "--out", str(out)]
    for pair in overrides:
        command += ["--set", pair]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0 or not (out / name / "sweep.json").exists():
        raise RuntimeError(f"fedsim sweep failed:\n{proc.stdout}\n{proc.stderr}")
    runs: dict[str, list[Path]] = {str(v["name"]): [] for v in variants}
    runs.update(read_sweep(out / name))
    return runs


def read_sweep(sweep_dir: Path, *, skip_failed: bool = False) -> dict[str, list[Path]]:
    """The run directories of a finished sweep folder per variant ``name``, in
    seed order; an experiment that did not complete raises, or is left out
    with ``skip_failed``."""
    runs: dict[str, list[Path]] = {}
    for entry in json.loads((sweep_dir / "sweep.json").read_text())["experiments"]:
        if entry["status"] != "completed":
            if skip_failed:
                continue
            raise RuntimeError(f"{entry['run_dir']}: {entry['status']}")
        runs.setdefault(str(entry["settings"]["name"]), []).append(
            sweep_dir / entry["run_dir"]
        )
    return runs


def mean_std(values: Sequence[float], digits: int = 3) -> str:
    """``mean ± std`` (sample standard deviation) of one column over seeds."""
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def interval(values: Sequence[float]) -> tuple[float, float]:
    """The mean ± std interval of ``values``."""
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean - std, mean + std


def separated(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether the mean ± std intervals of ``a`` and ``b`` do not overlap."""
    (lo_a, hi_a), (lo_b, hi_b) = interval(a), interval(b)
    return hi_a < lo_b or hi_b < lo_a


def seeds_argument(text: str) -> list[int]:
    """``--seeds 0,1,2`` as a list."""
    return [int(s) for s in text.split(",") if s.strip()]
