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
import os
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from contextlib import suppress
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
from fedsim.engine.lifeline import Lifeline, die_with_parent, stop_signals
from fedsim.engine.processes import (
    descendants,
    free_port,
    stop_processes,
    stop_tree,
)
from fedsim.engine.recorder import summary_base

LOGS_DIR = "logs"
STARTUP_TIMEOUT = 60.0
T = TypeVar("T")


class SimulationError(RuntimeError):
    """The simulation runtime could not be started."""


def _executable(name: str) -> str:
    """A console script of this environment (next to the running Python)."""
    local = Path(sys.executable).with_name(name)
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise SimulationError(f"{name!r} not found; is flwr installed?")
    return found


def environment_path() -> str:
    """``PATH`` with this interpreter's ``bin/`` first.

    The SuperLink starts Flower's own executables by name (``flower-superexec``,
    ``flwr-serverapp``...); from a shell where this environment is not activated
    (cron, some notebook kernels, ``/path/to/venv/bin/fedsim``) they would not be
    found otherwise.
    """
    here = str(Path(sys.executable).parent)
    rest = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != here]
    return os.pathsep.join([here, *rest])


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
                        "serverapp": "fedsim.engine.server_app:app",
                        "clientapp": "fedsim.engine.client_app:app",
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


def _log_tail(path: Path, lines: int = 15) -> str:
    with suppress(OSError):
        return "\n".join(path.read_text("utf-8", "replace").splitlines()[-lines:])
    return ""


def spawn(
    command: list[str], env: dict[str, str], log: Path
) -> subprocess.Popen[bytes]:
    """Start ``command`` in its own session, output appended to ``log``."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            command,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )


def flower_home(connection: dict[str, Any]) -> tuple[Path, dict[str, str]]:
    """A private ``FLWR_HOME`` whose default connection ``fedsim`` is
    ``connection`` (a ``[superlink.<name>]`` table: ``address``, ``insecure`` or
    ``root-certificates``), and the environment for Flower's commands."""
    home = Path(tempfile.mkdtemp(prefix="fedsim-flwr-"))
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "PATH": environment_path(),
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PYTHONUNBUFFERED": "1",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        "RAY_DEDUP_LOGS": "0",
    }
    config = {"superlink": {"default": "fedsim", "fedsim": connection}}
    (home / "config.toml").write_text(tomli_w.dumps(config), "utf-8")
    return home, env


def loopback(port: int) -> dict[str, Any]:
    """The connection to a plain-text SuperLink on ``127.0.0.1:port``."""
    return {"address": f"127.0.0.1:{port}", "insecure": True}


@dataclass(frozen=True)
class Tls:
    """A SuperLink's TLS files (``docker/certs.sh`` writes them)."""

    certfile: Path
    keyfile: Path
    ca_certfile: Path


def superlink_command(
    port: int,
    *,
    simulation: bool,
    tls: Tls | None = None,
    supernode_auth: bool = False,
) -> list[str]:
    """``flower-superlink`` on loopback; apps run from the installed environment.

    Plain text unless ``tls`` is given; ``supernode_auth`` admits only the
    SuperNodes whose public keys were registered.
    """
    files = ("certfile", "keyfile", "ca-certfile")
    security = ["--insecure"]
    if tls:
        security = [f"--ssl-{k}={getattr(tls, k.replace('-', '_'))}" for k in files]
    return [
        _executable("flower-superlink"),
        *security,
        *(["--enable-supernode-auth"] if supernode_auth else []),
        *(["--simulation"] if simulation else []),
        "--disable-runtime-dependency-installation",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


def submit_command(app_dir: Path, federation: str | None = None) -> list[str]:
    """``flwr run`` of the app on the ``fedsim`` connection, streaming its logs."""
    extra = ["--federation-config", federation] if federation else []
    return [_executable("flwr"), "run", str(app_dir), "fedsim", "--stream", *extra]


def launch(
    config: dict[str, Any],
    federation: str,
    logs: Path,
    *,
    description: str,
    finish: Callable[[str | None, str | None], T],
    on_poll: Callable[[], None] = lambda: None,
    poll_interval: float = 0.5,
    ended: Callable[[], bool] = lambda: False,
) -> T:
    """Start a private SuperLink, submit the app with run-config ``config`` and
    wait for it (or for ``ended()``, seconds earlier); stop every process
    started, whatever happens, then return ``finish(status, reason)``.

    ``(status, reason)`` is ``(None, None)`` when the app ended by itself (the
    run directories say how), else how it ended (``failed`` with the reason,
    ``interrupted``). SIGINT/SIGTERM stop the run once; from the first one (or
    the end of the app) until ``finish`` returns, further ones are ignored
    (:class:`StopSignals`). Should this process die without cleaning up, the
    :class:`fedsim.engine.lifeline.Lifeline` watchdog stops what it started.
    """
    logs.mkdir(parents=True, exist_ok=True)
    port = free_port()
    home, env = flower_home(loopback(port))
    write_app(home / "app", config, description)
    superlink: subprocess.Popen[bytes] | None = None
    submit: subprocess.Popen[bytes] | None = None
    lifeline: Lifeline | None = None
    status: str | None = None
    reason: str | None = None
    seen: dict[int, psutil.Process] = {}  # everything ever started under it
    with stop_signals() as signals:
        try:
            lifeline = Lifeline()
            superlink = spawn(
                superlink_command(port, simulation=True), env, logs / "superlink.log"
            )
            lifeline.watch(superlink.pid)
            wait_healthy(superlink, port, logs / "superlink.log")
            submit = spawn(
                submit_command(home / "app", federation), env, logs / "flower.log"
            )
            lifeline.watch(submit.pid)
            while submit.poll() is None and not ended():
                seen.update((p.pid, p) for p in descendants(superlink.pid))
                on_poll()
                if superlink.poll() is not None:
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
            if superlink is not None:
                seen.update((p.pid, p) for p in descendants(superlink.pid))
            # a run over by itself has nothing left to save: 1 s to go, not 15
            grace = 1.0 if status is None else 15.0
            for proc in (submit, superlink):
                if proc is not None:
                    stop_tree(proc.pid, grace)
            # what was started under the SuperLink but left its tree (re-parented)
            stop_processes(seen.values())
            if lifeline is not None:
                lifeline.close()
            shutil.rmtree(home, ignore_errors=True)
        return finish(status, reason)


def settle(
    run_dir: Path,
    status: str | None,
    reason: str | None,
    logs: Path,
    exp: Experiment | None = None,
) -> Outcome:
    """How the run in ``run_dir`` ended, written into its ``summary.json``.

    ``status``/``reason`` from :func:`launch` win; otherwise a run that still
    says ``running`` (or never started) failed, with the log's tail as reason.
    Fields the ServerApp never wrote (a run stopped before it started) come
    from ``exp`` (:func:`fedsim.engine.recorder.summary_base`).
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
            reason += _log_tail(logs / "flower.log")
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
) -> Outcome:
    """Run ``exp`` to the end on a private SuperLink; results land in ``run_dir``.

    ``on_poll`` is called about every ``poll_interval`` seconds while the run goes
    (the CLI refreshes its progress display there). ``resume``: continue the
    run in ``run_dir`` from its checkpoint (:mod:`fedsim.engine.checkpoint`).
    """
    logs = run_dir / LOGS_DIR
    before = read_summary(run_dir).get("finished_at")  # a resumed run's last end
    return launch(
        {**run_config_of(exp, run_dir, resume=resume), ASSIGN_KEY: True},
        federation_config(exp),
        logs,
        description=f"fedsim run {exp.name}",
        finish=lambda status, reason: settle(run_dir, status, reason, logs, exp),
        on_poll=on_poll,
        ended=lambda: ended(read_summary(run_dir), before),
        poll_interval=poll_interval,
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
    ``[resources]`` (the SuperNodes and their Ray resources)."""
    first = runs[0][0]
    federation = federation_config(first)
    for exp, _ in runs:
        if federation_config(exp) != federation:
            raise ValueError(
                "one Flower run serves experiments with the same federation.clients "
                "and resources only"
            )
    entries = [
        {"config": run_config_of(exp, run_dir), RUN_DIR_KEY: str(run_dir)}
        for exp, run_dir in runs
    ]
    return launch(
        {SWEEP_KEY: json.dumps(entries), ASSIGN_KEY: True},
        federation,
        logs,
        description=f"fedsim sweep {first.name}",
        finish=lambda status, reason: [
            settle(run_dir, status, reason, logs, exp) for exp, run_dir in runs
        ],
        on_poll=on_poll,
        poll_interval=poll_interval,
    )


def wait_healthy(
    proc: subprocess.Popen[bytes], port: int, log: Path, tls: Tls | None = None
) -> None:
    """Wait until the SuperLink on ``port`` answers its health check (over
    HTTPS, verified with the CA of ``tls``, when it has TLS)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    scheme = "https" if tls else "http"
    context = ssl.create_default_context(cafile=tls.ca_certfile) if tls else None
    url = f"{scheme}://127.0.0.1:{port}/health"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SimulationError(
                f"flower-superlink exited with code {proc.returncode}:\n"
                + _log_tail(log)
            )
        with (
            suppress(OSError),
            urllib.request.urlopen(url, timeout=1, context=context) as response,
        ):
            if response.status == 200:
                return
        time.sleep(0.1)
    raise SimulationError(f"flower-superlink not ready after {STARTUP_TIMEOUT:.0f} s")
