"""The one front door of a run: ``fedsim run`` and ``fedsim.run(...)`` go
through :func:`start`.

:func:`start` is the sequence both take: load the experiment (or the run
directory's, on ``--resume``), run every pre-run check while the private
SuperLink starts (nothing is written before they pass), create and lock the run
directory, then simulate (:mod:`fedsim.engine.host.local_simulation`) or submit
to an existing SuperLink (:mod:`fedsim.engine.host.remote`), showing progress
as rounds close. The CLI (:mod:`fedsim.engine.host.cli`) prints a summary table
and turns the outcome into an exit code; :func:`run`, the Python API, returns
the finished run as :func:`fedsim.analysis.load_run` reads it. In a Jupyter
notebook the progress is an HTML progress bar updated in place; in a terminal,
one line per round.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsim.core import registry
from fedsim.core.errors import ConfigError
from fedsim.core.experiment import Experiment
from fedsim.core.loading import load_experiment
from fedsim.engine.host.checks import preflight
from fedsim.engine.host.progress import (
    Display,
    Progress,
    QuietDisplay,
    default_display,
)


@dataclass(frozen=True)
class Request:
    """What to run, as the CLI's options or :func:`run`'s arguments say it.

    ``experiment``/``overrides``: the experiment TOML (the quickstart when
    None) and ``KEY=VALUE`` overrides; ``out``: where run directories go
    (``out_flag`` names it in errors); ``resume``: a run directory to continue
    instead; ``ray_address``: the Ray cluster to run the clients on (overrides
    ``resources.ray-address``); ``superlink``: an existing SuperLink's
    ``HOST:PORT`` instead of a private simulation, trusted through
    ``root_certificates`` or ``insecure``
    (:class:`fedsim.engine.host.remote.Connection`), ``remote_out`` the run
    directories' folder as its host sees it; ``who``: what holds the run
    directory's lock (in the error another process gets)."""

    experiment: str | Path | None = None
    overrides: Sequence[str] = ()
    out: str | Path = "runs"
    out_flag: str = "--out"
    resume: str | Path | None = None
    ray_address: str | None = None
    superlink: str | None = None
    root_certificates: Path | None = None
    insecure: bool = False
    remote_out: str | Path | None = None
    who: str = "fedsim run"


@dataclass(frozen=True)
class Started:
    """A run about to start: its experiment, run directory, and the last round
    it completed before (-1 for a new run)."""

    exp: Experiment
    run_dir: Path
    done: int

    @property
    def resumed(self) -> bool:
        return self.done >= 0


def resumed_experiment(
    resume: str | Path, experiment: str | Path | None, overrides: Sequence[str]
) -> tuple[Experiment, Path, int]:
    """The experiment, run directory and last checkpointed round of ``--resume``.

    The experiment is the run directory's ``config.toml``; an experiment file or
    ``--set`` given as well must resolve to the same experiment.
    """
    from fedsim.core.loading import to_run_config
    from fedsim.core.rundir import CONFIG_FILE
    from fedsim.engine.server.resume_checkpoint import check_resumable

    run_dir = Path(resume).resolve()
    saved = check_resumable(run_dir)
    exp = load_experiment(str(run_dir / CONFIG_FILE), [])
    refusal = registry.family(exp.strategy.name).resume
    if refusal:
        raise ConfigError(f"--resume: strategy {exp.strategy.name!r}: {refusal}")
    if experiment or overrides:
        source = experiment or str(run_dir / CONFIG_FILE)
        given = to_run_config(load_experiment(source, overrides))
        stored = to_run_config(exp)
        changed = sorted(k for k in {*given, *stored} if given.get(k) != stored.get(k))
        if changed:
            raise ConfigError(
                f"--resume: {changed[0]} = {given.get(changed[0])!r} differs from "
                f"the run's {stored.get(changed[0])!r}; a resumed run continues the "
                "same experiment"
            )
    return exp, run_dir, int(saved["round"])


def start(
    request: Request,
    display: Callable[[Experiment], Display],
    *,
    announce: Callable[[Started], None] = lambda started: None,
) -> tuple[Started, Any]:
    """Run ``request`` to its end (see module doc): ``display(exp)`` shows its
    rounds, ``announce`` is told of the run once its directory exists, before
    it starts. Returns the run and its
    :class:`fedsim.engine.host.local_simulation.Outcome`. Raises
    :class:`ConfigError` before anything is written when a check fails."""
    with ExitStack() as stack:
        return _start(request, display, announce, stack)


def _start(
    request: Request,
    display: Callable[[Experiment], Display],
    announce: Callable[[Started], None],
    stack: ExitStack,
) -> tuple[Started, Any]:
    from fedsim.core.locking import locked
    from fedsim.engine.host import cluster
    from fedsim.engine.host.local_simulation import simulate
    from fedsim.engine.host.remote import Connection, run_remote
    from fedsim.engine.host.superlink import start_during
    from fedsim.engine.server.run_recorder import check_out, create_run_dir

    remote = request.superlink is not None
    if not remote and (
        request.root_certificates or request.insecure or request.remote_out
    ):
        flag = "--root-certificates" if request.root_certificates else "--insecure"
        flag = "--remote-out" if request.remote_out else flag
        raise ConfigError(f"{flag}: only with --superlink HOST:PORT")
    if remote and request.resume:
        raise ConfigError("--resume: not with --superlink (private simulations only)")
    if remote and request.ray_address:
        raise ConfigError("--ray-address: not with --superlink (simulations only)")
    connection = None
    if request.superlink is not None:
        connection = Connection(
            request.superlink, request.root_certificates, request.insecure
        )
    out: Path | None = None
    if request.resume:
        if Path(request.resume).is_dir():  # before anything is read: a live run
            stack.enter_context(locked(Path(request.resume), f"{request.who} --resume"))
        exp, resumed, done = resumed_experiment(
            request.resume, request.experiment, request.overrides
        )
    else:
        exp = load_experiment(request.experiment, request.overrides)
        out, done = check_out(request.out, request.out_flag), -1
    if request.ray_address is not None:  # on --resume too: results do not change
        exp = cluster.on_cluster(exp, request.ray_address, "--ray-address")
    if not remote:
        cluster.note_ignored(exp.resources.ray_address)

    def prepare() -> Path:
        preflight(exp, local=not remote)
        return resumed if out is None else create_run_dir(out, exp, request.out_flag)

    # a local run's SuperLink starts while the experiment is checked
    where = exp.resources.ray_address
    superlink, run_dir = (None, prepare()) if remote else start_during(prepare, where)
    if out is not None:
        stack.enter_context(locked(run_dir, request.who))
    started = Started(exp, run_dir, done)
    announce(started)
    remote_dir = None
    if request.remote_out:
        remote_dir = Path(request.remote_out) / run_dir.name
    progress = Progress(display(exp), run_dir, exp, done=done)
    try:
        if connection is not None:
            outcome = run_remote(
                exp,
                run_dir,
                connection,
                remote_dir=remote_dir,
                on_poll=progress.poll,
            )
        else:
            outcome = simulate(
                exp,
                run_dir,
                on_poll=progress.poll,
                resume=bool(request.resume),
                superlink=superlink,
            )
    finally:
        progress.close()
    return started, outcome


def run(
    experiment: str | Path | None = None,
    overrides: Sequence[str] = (),
    out: str | Path = "runs",
    *,
    progress: bool = True,
) -> Any:
    """Run an experiment as ``fedsim run`` does and return the finished run.

    Parameters
    ----------
    experiment : str or Path, optional
        Experiment TOML; the packaged quickstart when omitted.
    overrides : sequence of str
        ``KEY=VALUE`` dotted-key overrides, as ``--set`` takes them.
    out : str or Path
        Where the run directory goes (default ``./runs``).
    progress : bool
        Show progress (a notebook bar in Jupyter, lines elsewhere).

    Returns
    -------
    fedsim.analysis.runs.Run
        What :func:`fedsim.analysis.load_run` reads from the run directory
        (``status`` tells whether it completed).

    Raises
    ------
    ConfigError
        Invalid experiment or a failed pre-run check (nothing is written).
    KeyboardInterrupt
        The run was interrupted (its directory says ``interrupted``).
    """
    from fedsim.analysis import load_run

    request = Request(experiment, tuple(overrides), out, "out", who="fedsim.run")

    def display(exp: Experiment) -> Display:
        return default_display(exp.name) if progress else QuietDisplay()

    started, outcome = start(request, display)
    if outcome.status == "interrupted":
        raise KeyboardInterrupt(f"run interrupted; see {started.run_dir}")
    return load_run(started.run_dir)
