"""Sweeps: a grid of experiments, start-up paid once.

``fedsim sweep SWEEP.toml`` (and :func:`sweep`) validates every experiment of
the sweep file (:mod:`fedsim.core.sweeps`) and runs every pre-run check before
anything is written, then runs the experiments in one Flower run: one
SuperLink, one Ray session, the same SuperNodes and actors, the experiments one
after another (:func:`fedsim.engine.host.local_simulation.simulate_sweep`).
Experiments with another ``federation.clients`` or ``[resources]`` get a Flower
run of their own.

The sweep directory ``<out>/<sweep file stem>/`` holds one ordinary run
directory per experiment (``000-seed=0_data.alpha=0.1``...) and ``sweep.json``,
the index. Running the same sweep again skips the experiments that completed
and runs the others from scratch; a directory holding another sweep is refused.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedsim.core.errors import ConfigError
from fedsim.core.loading import to_toml
from fedsim.core.locking import check_free, locked
from fedsim.core.rundir import CHECKPOINTS_DIR, CONFIG_FILE, write_json
from fedsim.core.sweeps import SweepPoint, load_sweep
from fedsim.engine.host.checks import preflight
from fedsim.engine.host.local_simulation import (
    LOGS_DIR,
    Outcome,
    ray_group,
    read_summary,
    simulate_sweep,
)
from fedsim.engine.host.progress import (
    Display,
    PlainDisplay,
    Progress,
    QuietDisplay,
    default_display,
    in_notebook,
)
from fedsim.engine.server.run_recorder import check_out

SWEEP_INDEX = "sweep.json"
#: Statuses of an experiment that a re-run of the sweep keeps.
FINISHED = ("completed", "stopped")


@dataclass(frozen=True)
class SweepPlan:
    """A validated sweep: where it goes, every experiment, those still to run."""

    directory: Path
    source: Path
    points: list[SweepPoint]
    todo: list[SweepPoint]

    def run_dir(self, point: SweepPoint) -> Path:
        return self.directory / point.dirname


def plan(
    sweep_file: str | Path, overrides: Sequence[str] = (), out: str | Path = "runs"
) -> SweepPlan:
    """Validate every experiment and find what is left to run; writes nothing.

    Raises
    ------
    ConfigError
        The first invalid experiment (its index, settings and key), or a sweep
        directory that holds another sweep.
    """
    points = load_sweep(sweep_file, overrides)
    root = check_out(out)
    for point in points:
        try:
            preflight(point.experiment)
        except ConfigError as err:
            raise ConfigError(
                f"sweep experiment {point.index} ({point.label}): {err}"
            ) from None
    directory = root / Path(sweep_file).stem
    todo = []
    for point in points:
        run_dir = directory / point.dirname
        config = run_dir / CONFIG_FILE
        if config.exists() and config.read_text("utf-8") != to_toml(point.experiment):
            raise ConfigError(
                f"{directory}: holds another sweep (experiment {point.index}, "
                f"{point.label}, has other settings); choose another --out"
            )
        if read_summary(run_dir).get("status") not in FINISHED:
            todo.append(point)
    return SweepPlan(directory, Path(sweep_file).resolve(), points, todo)


def _prepare(plan: SweepPlan) -> None:
    plan.directory.mkdir(parents=True, exist_ok=True)
    for point in plan.todo:
        run_dir = plan.run_dir(point)
        shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished earlier try
        (run_dir / CHECKPOINTS_DIR).mkdir(parents=True)
        (run_dir / CONFIG_FILE).write_text(to_toml(point.experiment), "utf-8")


def write_index(plan: SweepPlan) -> dict[str, Any]:
    """``sweep.json``: the sweep file, and per experiment its settings, run
    directory and status."""
    index = {
        "sweep": str(plan.source),
        "updated_at": datetime.now(UTC).isoformat(),
        "experiments": [
            {
                "index": point.index,
                "label": point.label,
                "settings": point.settings,
                "run_dir": point.dirname,
                "status": read_summary(plan.run_dir(point)).get("status", "pending"),
            }
            for point in plan.points
        ],
    }
    write_json(plan.directory / SWEEP_INDEX, index)
    return index


def execute(
    plan: SweepPlan,
    *,
    display: Callable[[SweepPoint], Display] | None = None,
) -> list[Outcome]:
    """Run what is left of ``plan``; one Flower run per group of experiments
    that share their SuperNodes' settings. Returns the outcomes of the
    experiments run, in order. The sweep directory and the run directories of
    the experiments left are locked meanwhile (:mod:`fedsim.core.locking`): a
    second identical sweep, or a ``--resume`` of one of its runs, is refused."""
    check_free(plan.directory)
    for point in plan.todo:  # a run being resumed on its own is not cleared
        check_free(plan.run_dir(point))
    plan.directory.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        stack.enter_context(locked(plan.directory, "fedsim sweep"))
        _prepare(plan)
        for point in plan.todo:
            stack.enter_context(locked(plan.run_dir(point), "fedsim sweep"))
        return _execute(plan, display)


def _execute(
    plan: SweepPlan, display: Callable[[SweepPoint], Display] | None
) -> list[Outcome]:
    write_index(plan)
    groups: dict[tuple[str, str], list[SweepPoint]] = {}
    for point in plan.todo:
        groups.setdefault(ray_group(point.experiment), []).append(point)
    make = display or (lambda point: PlainDisplay())
    outcomes: list[Outcome] = []
    try:
        for members in groups.values():
            watches = [
                Progress(make(p), plan.run_dir(p), p.experiment) for p in members
            ]

            def poll(watches: list[Progress] = watches) -> None:
                for watch in watches:
                    watch.poll()

            try:
                outcomes += simulate_sweep(
                    [(p.experiment, plan.run_dir(p)) for p in members],
                    plan.directory / LOGS_DIR,
                    on_poll=poll,
                )
            finally:
                for watch in watches:
                    watch.close()
            if any(o.status == "interrupted" for o in outcomes):
                break
    finally:
        write_index(plan)
    return outcomes


def sweep(
    sweep_file: str | Path,
    overrides: Sequence[str] = (),
    out: str | Path = "runs",
    *,
    progress: bool = True,
) -> list[Any]:
    """Run a sweep as ``fedsim sweep`` does; return every experiment's run.

    Parameters
    ----------
    sweep_file : str or Path
        Experiment file with ``[grid]`` and/or ``[[variants]]``.
    overrides : sequence of str
        ``KEY=VALUE`` overrides of the base experiment.
    out : str or Path
        Where the sweep directory goes (default ``./runs``).
    progress : bool
        Print one line per round of each experiment.

    Returns
    -------
    list of fedsim.analysis.runs.Run
        Every experiment of the sweep (finished earlier or now), in order.

    Raises
    ------
    ConfigError
        An invalid experiment (nothing is written).
    KeyboardInterrupt
        The sweep was interrupted (a re-run finishes it).
    """
    from fedsim.analysis import load_run

    work = plan(sweep_file, overrides, out)
    total = len(work.points)

    def show(point: SweepPoint) -> Display:
        title = f"[{point.index + 1}/{total}] {point.label}"
        if not progress:
            return QuietDisplay()
        return default_display(title) if in_notebook() else PlainDisplay(title + ": ")

    outcomes = execute(work, display=show)
    if any(o.status == "interrupted" for o in outcomes):
        raise KeyboardInterrupt("sweep interrupted; run it again to finish it")
    return [load_run(work.run_dir(p)) for p in work.points]
