"""Run an experiment on Flower's simulation runtime (Ray backend).

The supported way to simulate with Flower 1.41 is a SuperLink in simulation mode
plus ``flwr run``. The runner starts a private SuperLink on a free loopback port
(with its own ``FLWR_HOME``), submits a generated Flower App whose run-config is the
resolved experiment, follows the run directory for progress, and stops every
process it started (the SuperLink and all its descendants: the simulation process
and Ray) when the run ends, fails, or is interrupted.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psutil
import tomli_w

from fedsim import __version__
from fedsim.core.experiment import Experiment
from fedsim.core.loading import (
    ASSIGN_KEY,
    RESUME_KEY,
    RUN_DIR_KEY,
    SWEEP_KEY,
    to_run_config,
)
from fedsim.core.rundir import SUMMARY_FILE, ended, read_summary, write_json
from fedsim.engine.host.lifeline import stop_signals
from fedsim.engine.host.processes import descendants, stop_tree
from fedsim.engine.host.superlink import (
    PrivateSuperLink,
    SimulationError,
    executable,
    log_tail,
    spawn,
)
from fedsim.engine.server.run_recorder import summary_base

LOGS_DIR = "logs"
T = TypeVar("T")


def write_app(app_dir: Path, config: dict[str, Any], description: str) -> None:
    """A minimal Flower App: fedsim's components with ``config`` as run-config."""
    pyproject = {
        "project": {
            "name": "fedsim-run",
            "version": __version__,
            "description": description,
            "license": "Apache-2.0",
            "dependencies": [],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "fedsim",
                    "components": {
                        "serverapp": "fedsim.engine.server.server_app:app",
                        "clientapp": "fedsim.engine.client.client_app:app",
                    },
                    "config": config,
                }
            }
        },
    }
    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / "pyproject.toml").write_text(tomli_w.dumps(pyproject), "utf-8")


def run_config_of(
    exp: Experiment, run_dir: Path, *, resume: bool = False
) -> dict[str, Any]:
    """The run-config of one experiment writing to ``run_dir`` (``resume``:
    continuing from its checkpoint)."""
    config: dict[str, Any] = dict(to_run_config(exp))
    config[RUN_DIR_KEY] = str(run_dir)
    if resume:
        config[RESUME_KEY] = True
    return config


def federation_config(exp: Experiment) -> str:
    """``flwr run --federation-config`` value: clients and their Ray resources."""
    res = exp.resources
    return (
        f"num-supernodes={exp.federation.clients} "
        f"client-resources-num-cpus={res.num_cpus} "
        f"client-resources-num-gpus={res.num_gpus}"
    )


def ray_group(exp: Experiment) -> tuple[str, str]:
    """What experiments of one Flower run share: the ``--federation-config``
    and the Ray cluster (``resources.ray-address``; empty: a local Ray)."""
    return federation_config(exp), exp.resources.ray_address


@dataclass
class Outcome:
    """How a run ended."""

    status: str
    summary: dict[str, Any]


#: A Python exception line in a log (``RuntimeError: ...``, ``Exception: ...``).
_EXCEPTION_LINE = re.compile(r"^[\w.]*(Error|Exception|Interrupt)\b[^:]*: .+")


def first_exception(path: Path) -> str | None:
    """The first exception line of a log: in a chain of tracebacks, the cause."""
    try:
        text = path.read_text("utf-8", errors="replace").splitlines()
    except OSError:
        return None
    return next((ln.strip() for ln in text if _EXCEPTION_LINE.match(ln)), None)


def submit_command(app_dir: Path, federation: str | None = None) -> list[str]:
    """``flwr run`` of the app on the ``fedsim`` connection, streaming its logs."""
    extra = ["--federation-config", federation] if federation else []
    return [executable("flwr"), "run", str(app_dir), "fedsim", "--stream", *extra]


def submit_and_follow(
    config: dict[str, Any],
    federation: str,
    logs: Path,
    *,
    description: str,
    finish: Callable[[str | None, str | None], T],
    on_poll: Callable[[], None] = lambda: None,
    poll_interval: float = 0.5,
    ended: Callable[[], bool] = lambda: False,
    superlink: PrivateSuperLink | None = None,
    ray_address: str = "",
) -> T:
    """Submit the app with run-config ``config`` to a private SuperLink
    (``superlink``, started earlier by the caller, or one started here) and
    wait for it (or for ``ended()``, seconds earlier); stop every process
    started, whatever happens, then return ``finish(status, reason)``. The
    simulation runs on a private loopback Ray, or attached to the Ray cluster
    at ``ray_address`` (a given ``superlink`` must have been started so).

    ``(status, reason)`` is ``(None, None)`` when the app ended by itself (the
    run directories say how), else how it ended (``failed`` with the reason,
    ``interrupted``). SIGINT/SIGTERM stop the run once; from the first one (or
    the end of the app) until ``finish`` returns, further ones are ignored
    (:class:`StopSignals`). Should this process die without cleaning up, the
    SuperLink's :class:`fedsim.engine.host.lifeline.Lifeline` watchdog stops what it
    started. The SuperLink's log ends up in ``logs/superlink.log``.
    """
    logs.mkdir(parents=True, exist_ok=True)
    link = superlink
    submit: subprocess.Popen[bytes] | None = None
    status: str | None = None
    reason: str | None = None
    seen: dict[int, psutil.Process] = {}  # everything ever started under it
    with stop_signals() as signals:
        try:
            if link is None:
                link = PrivateSuperLink(ray_address)
            if link.ray_address != ray_address:
                raise SimulationError("the SuperLink was started for another Ray")
            write_app(link.home / "app", config, description)
            link.wait_healthy()
            submit = spawn(
                submit_command(link.home / "app", federation),
                link.env,
                logs / "flower.log",
            )
            link.lifeline.watch(submit.pid)
            while submit.poll() is None and not ended():
                seen.update((p.pid, p) for p in descendants(link.process.pid))
                on_poll()
                if link.process.poll() is not None:
                    status = "failed"
                    reason = "the SuperLink exited unexpectedly; see logs/superlink.log"
                    break
                time.sleep(poll_interval)
            on_poll()
        except KeyboardInterrupt:
            status, reason = (
                "interrupted",
                "interrupted by the user (Ctrl-C or SIGTERM)",
            )
        except SimulationError as err:
            status, reason = "failed", str(err)
        except Exception as err:  # never leave a run directory saying "running"
            status, reason = "failed", f"fedsim: {type(err).__name__}: {err}"
        finally:
            signals.stop()
            if link is not None:
                seen.update((p.pid, p) for p in descendants(link.process.pid))
            # a run over by itself has nothing left to save: 1 s to go, not 15
            grace = 1.0 if status is None else 15.0
            if submit is not None:
                stop_tree(submit.pid, grace)
            if link is not None:
                # and what was started under it but left its tree (re-parented)
                link.close(
                    grace, leftovers=seen.values(), log_to=logs / "superlink.log"
                )
        return finish(status, reason)


def settle(
    run_dir: Path,
    status: str | None,
    reason: str | None,
    logs: Path,
    exp: Experiment | None = None,
) -> Outcome:
    """How the run in ``run_dir`` ended, written into its ``summary.json``.

    ``status``/``reason`` from :func:`submit_and_follow` win; otherwise a run that still
    says ``running`` (or never started) failed, with the log's tail as reason.
    Fields the ServerApp never wrote (a run stopped before it started) come
    from ``exp`` (:func:`fedsim.engine.server.run_recorder.summary_base`).
    """
    written = read_summary(run_dir)
    summary = {**(summary_base(exp) if exp is not None else {}), **written}
    if status is None:
        status = written.get("status", "failed")
        if status == "running" or not written:
            status = "failed"
            cause = first_exception(logs / "flower.log")
            why = f" ({cause})" if cause else ""
            reason = f"the ServerApp ended unfinished{why}; see logs/flower.log:\n"
            reason += log_tail(logs / "flower.log")
    elif summary.get("status") in ("completed", "stopped"):
        status, reason = summary["status"], summary.get("reason")
    summary.update(status=status, reason=reason or summary.get("reason"))
    if summary != written:
        write_json(run_dir / SUMMARY_FILE, summary)
    return Outcome(status, summary)


def simulate(
    exp: Experiment,
    run_dir: Path,
    *,
    on_poll: Callable[[], None] = lambda: None,
    poll_interval: float = 0.5,
    resume: bool = False,
    superlink: PrivateSuperLink | None = None,
) -> Outcome:
    """Run ``exp`` to the end on a private SuperLink; results land in ``run_dir``.

    ``on_poll`` is called about every ``poll_interval`` seconds while the run goes
    (the CLI refreshes its progress display there). ``resume``: continue the
    run in ``run_dir`` from its checkpoint
    (:mod:`fedsim.engine.server.resume_checkpoint`).
    ``superlink``: one the caller started already (see :func:`submit_and_follow`).
    """
    logs = run_dir / LOGS_DIR
    before = read_summary(run_dir).get("finished_at")  # a resumed run's last end
    return submit_and_follow(
        {**run_config_of(exp, run_dir, resume=resume), ASSIGN_KEY: True},
        federation_config(exp),
        logs,
        description=f"fedsim run {exp.name}",
        finish=lambda status, reason: settle(run_dir, status, reason, logs, exp),
        on_poll=on_poll,
        ended=lambda: ended(read_summary(run_dir), before),
        poll_interval=poll_interval,
        superlink=superlink,
        ray_address=exp.resources.ray_address,
    )


def simulate_sweep(
    runs: Sequence[tuple[Experiment, Path]],
    logs: Path,
    *,
    on_poll: Callable[[], None] = lambda: None,
    poll_interval: float = 0.5,
) -> list[Outcome]:
    """Run several experiments in one Flower run: one SuperLink, one Ray
    session, the same SuperNodes and actors, the experiments one after another
    (the ServerApp's ``run_sweep``). They must share ``federation.clients`` and
    ``[resources]`` (the SuperNodes, their Ray resources, the Ray cluster)."""
    first = runs[0][0]
    federation = federation_config(first)
    for exp, _ in runs:
        if ray_group(exp) != ray_group(first):
            raise ValueError(
                "one Flower run serves experiments with the same federation.clients "
                "and resources only"
            )
    entries = [
        {"config": run_config_of(exp, run_dir), RUN_DIR_KEY: str(run_dir)}
        for exp, run_dir in runs
    ]
    return submit_and_follow(
        {SWEEP_KEY: json.dumps(entries), ASSIGN_KEY: True},
        federation,
        logs,
        description=f"fedsim sweep {first.name}",
        finish=lambda status, reason: [
            settle(run_dir, status, reason, logs, exp) for exp, run_dir in runs
        ],
        on_poll=on_poll,
        poll_interval=poll_interval,
        ray_address=first.resources.ray_address,
    )
