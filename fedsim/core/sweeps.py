"""Sweep files: an experiment plus a grid and/or variants of overrides.

A sweep file is an ordinary experiment file (every usual table is the base) plus

- ``[grid]``: dotted keys -> lists of values; the cross product is run, in the
  order the keys are written (``seed = [0, 1, 2]``,
  ``"strategy.name" = ["flora", "fedit"]``, or nested: ``[grid.data]
  alpha = [0.1, 1.0]``);
- ``[[variants]]``: override tables, each one more experiment (with a grid: each
  variant times each grid point).

Every experiment keeps the base's ``name`` (so ``fedsim report`` labels the runs
by the settings that differ) and is validated before anything runs; an error
names the experiment's index and its settings.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsim.core.errors import ConfigError
from fedsim.core.experiment import Experiment
from fedsim.core.loading import from_flat, parse_override, read_toml
from fedsim.core.schema import flatten

GRID, VARIANTS = "grid", "variants"


@dataclass(frozen=True)
class SweepPoint:
    """One experiment of a sweep.

    Parameters
    ----------
    index : int
        Its place in the sweep (0-based).
    settings : dict
        The dotted keys the grid and the variant set for it.
    experiment : Experiment
        The validated experiment.
    """

    index: int
    settings: dict[str, Any]
    experiment: Experiment

    @property
    def label(self) -> str:
        """``key=value`` pairs of its settings (``base`` when it has none)."""
        return label_of(self.settings)

    @property
    def dirname(self) -> str:
        """Its run directory's name inside the sweep directory."""
        slug = re.sub(r"[^A-Za-z0-9._=-]+", "_", self.label.replace(", ", "_"))
        return f"{self.index:03d}-{slug}"[:120]


def label_of(settings: Mapping[str, Any]) -> str:
    """``key=value`` pairs of a sweep experiment's settings."""
    return ", ".join(f"{k}={_show(v)}" for k, v in settings.items()) or "base"


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _grid(table: Any) -> list[tuple[str, list[Any]]]:
    if not isinstance(table, dict):
        raise ConfigError(f"{GRID}: expected a table of dotted keys -> lists")
    out = []
    for key, values in flatten(table).items():
        if not isinstance(values, list) or not values:
            raise ConfigError(
                f"{GRID}.{key}: expected a non-empty list of values, got {values!r}"
            )
        out.append((key, values))
    return out


def _variants(items: Any) -> list[dict[str, Any]]:
    if not isinstance(items, list) or not all(isinstance(v, dict) for v in items):
        raise ConfigError(f"{VARIANTS}: expected an array of tables ([[variants]])")
    return [flatten(v) for v in items]


def sweep_points(
    table: Mapping[str, Any], overrides: Sequence[str] = ()
) -> list[SweepPoint]:
    """Every experiment of a parsed sweep file, validated.

    ``overrides`` (``KEY=VALUE``) change the base before the grid and the
    variants apply.

    Raises
    ------
    ConfigError
        One line: the first invalid experiment's index, settings and key.
    """
    body = dict(table)
    grid = _grid(body.pop(GRID, {}))
    variants = _variants(body.pop(VARIANTS, [{}])) or [{}]
    base = flatten(body)
    for text in overrides:
        key, value = parse_override(text)
        base[key] = value
    keys = [key for key, _ in grid]
    points = []
    combos = itertools.product(*(values for _, values in grid))
    for index, (combo, variant) in enumerate(itertools.product(list(combos), variants)):
        settings = {**dict(zip(keys, combo)), **variant}
        point = SweepPoint(index, settings, Experiment())
        try:
            exp = from_flat({**base, **settings})
        except ConfigError as err:
            raise ConfigError(
                f"sweep experiment {index} ({point.label}): {err}"
            ) from None
        points.append(SweepPoint(index, settings, exp))
    return points


def load_sweep(path: str | Path, overrides: Sequence[str] = ()) -> list[SweepPoint]:
    """Read and validate a sweep file (see the module docstring)."""
    return sweep_points(read_toml(Path(path), "sweep file"), overrides)
