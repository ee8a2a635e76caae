"""Launching runs: pre-run checks, progress displays, and :func:`run` (the Python
API behind ``fedsim run``).

``fedsim.run(...)`` (:func:`run`) is the same run as the CLI: it validates the
experiment (raising :class:`fedsim.core.errors.ConfigError`), runs every pre-run
check before anything is written, simulates, and returns the finished run as
:func:`fedsim.analysis.load_run` reads it. In a Jupyter notebook the progress is
an HTML progress bar updated in place; in a terminal, one line per round.
"""

from __future__ import annotations

import html
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from fedsim.core import registry
from fedsim.core.errors import ConfigError
from fedsim.core.experiment import Experiment
from fedsim.core.loading import load_experiment
from fedsim.core.rundir import ATTACK_PSNR, AUDIT_PHASE, read_metrics
from fedsim.engine.recorder import headline_of


def check_resources(exp: Experiment) -> None:
    """Ray would wait forever for resources this machine does not have."""
    import torch

    res = exp.resources
    cores = os.cpu_count() or 1
    if res.num_cpus > cores:
        raise ConfigError(
            f"resources.num-cpus: {res.num_cpus} exceeds the {cores} cores here"
        )
    gpus = torch.cuda.device_count()
    if res.num_gpus > gpus:
        raise ConfigError(
            f"resources.num-gpus: {res.num_gpus:g} requested per client but "
            f"{gpus} CUDA GPUs are visible"
        )
    if res.device == "cuda" and gpus == 0:
        raise ConfigError(
            "resources.device: 'cuda' requested but no CUDA GPU is visible"
        )


def preflight(exp: Experiment, *, local: bool = True) -> None:
    """Every pre-run check, before anything is written: resources (``local``
    runs only: on a SuperLink the SuperNodes' hosts have their own; this
    host's, or with ``resources.ray-address`` the Ray cluster's nodes and the
    fedsim they run), the data and the model built once, the family's own
    check (e.g. LoRA targets), the privacy mechanism's."""
    from fedsim import privacy
    from fedsim.engine import cluster
    from fedsim.learn.base import build_model
    from fedsim.learn.tasks import task_data

    res = exp.resources
    if local and res.ray_address:
        nodes = cluster.survey(res.ray_address)
        cluster.check_cluster(
            res.ray_address, res.num_cpus, res.num_gpus, res.device, nodes
        )
    elif local:
        check_resources(exp)
    data = task_data(exp)
    check_partitions(exp, data)
    model = build_model(exp.model, data.info, exp.seed)
    registry.family(exp.strategy.name).run_check(exp, model, data)
    privacy.preflight(exp, model, data)


def check_partitions(exp: Experiment, data: Any) -> None:
    """Every client has training examples (a client without any would fail in
    its first round): ConfigError naming the clients."""
    empty = [
        pid for pid in range(exp.federation.clients) if len(data.client(pid).train) == 0
    ]
    if empty:
        shown = ", ".join(map(str, empty[:10])) + (", ..." if len(empty) > 10 else "")
        raise ConfigError(
            f"data.partitioner: {len(empty)} of {exp.federation.clients} clients get "
            f"no training examples (clients {shown}) from {exp.data.partitioner!r} "
            f"over {len(data.pool)} examples; use fewer federation.clients, another "
            "partitioner or a larger data.min-partition-size / data.alpha"
        )


def audit_note(frame: Any, server_round: int) -> str:
    """The privacy audit's phase of a round, for its progress line: the mean
    ``attack-psnr`` and the attack's seconds ('' when the round was not
    audited)."""
    rows = frame[(frame["round"] == server_round) & frame["client"].isna()]
    psnr = rows[(rows["phase"] == "train") & (rows["metric"] == ATTACK_PSNR)]
    if psnr.empty:
        return ""
    spent = rows[(rows["phase"] == AUDIT_PHASE) & (rows["metric"] == "seconds")]
    seconds = float(spent["value"].iloc[0]) if len(spent) else float("nan")
    value = float(psnr["value"].iloc[0])
    return f"  audit: attack-psnr {value:.2f} dB ({seconds:.1f}s)"


class Display(Protocol):
    """Shows one line per closed round."""

    def round(self, server_round: int, rounds: int, line: str) -> None: ...

    def close(self) -> None: ...


class Progress:
    """Reads closed rounds from the run directory and hands them to a display."""

    def __init__(
        self, display: Display, run_dir: Path, exp: Experiment, *, done: int = -1
    ):
        self.display = display
        self.run_dir = run_dir
        self.rounds = exp.rounds
        self.headline = headline_of(exp)
        self.start = time.monotonic()
        #: The last round shown (a resumed run's rounds before it are not shown).
        self.done = done

    def poll(self) -> None:
        frame = read_metrics(self.run_dir)
        if frame is None:
            return
        closed = frame[(frame["phase"] == "server") & frame["client"].isna()]
        shown = frame[(frame["phase"] == self.headline) & frame["client"].isna()]
        for rnd in sorted(int(r) for r in closed["round"].unique()):
            if rnd <= self.done:
                continue
            rows = shown[shown["round"] == rnd].set_index("metric")["value"]
            nan = float("nan")
            line = (
                f"round {rnd:>3}/{self.rounds}"
                f"  accuracy {rows.get('accuracy', nan):.4f}"
                f"  loss {rows.get('loss', nan):.4f}"
                f"  elapsed {time.monotonic() - self.start:6.1f}s"
            ) + audit_note(frame, rnd)
            self.done = rnd
            self.display.round(rnd, self.rounds, line)

    def close(self) -> None:
        self.display.close()


class PlainDisplay:
    """One printed line per round (scripts, pipes, log files)."""

    def __init__(self, prefix: str = ""):
        self.prefix = prefix

    def round(self, server_round: int, rounds: int, line: str) -> None:
        print(f"{self.prefix}{line}", flush=True)

    def close(self) -> None:
        """Printed lines need no closing."""


class NotebookDisplay:
    """An HTML ``<progress>`` bar and the latest round's line, updated in place
    in the notebook's output (IPython's display handles; no widgets needed)."""

    def __init__(self, title: str):
        from IPython.display import HTML, display

        self._html = HTML
        self.title = title
        self.handle = display(HTML(self._render(0, 1, "starting...")), display_id=True)

    def _render(self, done: int, total: int, line: str) -> str:
        return (
            f"<div><b>{html.escape(self.title)}</b> "
            f'<progress value="{done}" max="{total}" style="width:30ex"></progress> '
            f"<code>{html.escape(line)}</code></div>"
        )

    def round(self, server_round: int, rounds: int, line: str) -> None:
        if self.handle is not None:
            self.handle.update(self._html(self._render(server_round, rounds, line)))

    def close(self) -> None:
        """The bar stays in the output with the last round shown."""


class QuietDisplay:
    """Shows nothing (``progress=False``)."""

    def round(self, server_round: int, rounds: int, line: str) -> None:
        """Nothing to show."""

    def close(self) -> None:
        """Nothing to close."""


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel."""
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    ipython = shell.get_ipython()  # type: ignore[attr-defined]
    return ipython is not None and type(ipython).__name__ == "ZMQInteractiveShell"


def default_display(title: str) -> Display:
    """A notebook bar in Jupyter, printed lines elsewhere."""
    return NotebookDisplay(title) if in_notebook() else PlainDisplay()


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
    from fedsim.core.locking import locked
    from fedsim.engine.cluster import note_ignored
    from fedsim.engine.recorder import check_out, create_run_dir
    from fedsim.engine.runner import simulate
    from fedsim.engine.superlink import start_during

    exp = load_experiment(experiment, overrides)
    where = check_out(out, "out")
    note_ignored(exp.resources.ray_address)

    def prepare() -> Path:
        preflight(exp)
        return create_run_dir(where, exp, "out")

    # it starts during the checks
    superlink, run_dir = start_during(prepare, exp.resources.ray_address)
    display: Display = default_display(exp.name) if progress else QuietDisplay()
    watch = Progress(display, run_dir, exp)
    try:
        with locked(run_dir, "fedsim.run"):
            outcome = simulate(exp, run_dir, on_poll=watch.poll, superlink=superlink)
    finally:
        watch.close()
    if outcome.status == "interrupted":
        raise KeyboardInterrupt(f"run interrupted; see {run_dir}")
    return load_run(run_dir)
