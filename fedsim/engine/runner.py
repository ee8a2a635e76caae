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
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

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
from fedsim.core.rundir import SUMMARY_FILE, write_json

LOGS_DIR = "logs"
STARTUP_TIMEOUT = 60.0


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


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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


def descendants(pid: int) -> list[psutil.Process]:
    """The live descendants of ``pid`` (empty if it is gone)."""
    try:
        return list(psutil.Process(pid).children(recursive=True))
    except psutil.NoSuchProcess:
        return []


def stop_tree(pid: int, timeout: float = 15.0) -> None:
    """Terminate a process and all its descendants (collected first), then kill."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    stop_processes(procs, timeout)


def stop_processes(procs: Iterable[psutil.Process], timeout: float = 15.0) -> None:
    """Terminate ``procs``; kill (with their children) those still alive after
    ``timeout``. Each ``psutil.Process`` remembers its start time, so a reused
    PID is never signalled."""
    procs = [p for p in procs if p.is_running()]
    for proc in procs:
        with suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        try:
            stragglers = [proc, *proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for p in stragglers:
            with suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(stragglers, timeout=5)


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C so that cleanup runs either way."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class Outcome:
    """How a run ended."""

    status: str
    summary: dict[str, Any]


def read_summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / SUMMARY_FILE
    try:
        return dict(json.loads(path.read_text("utf-8")))
    except (OSError, ValueError):
        return {}


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text("utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


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
        )


def flower_home(port: int) -> tuple[Path, dict[str, str]]:
    """A private ``FLWR_HOME`` whose default connection ``fedsim`` is the SuperLink
    on ``127.0.0.1:port``, and the environment for Flower's commands."""
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
    connection = {"address": f"127.0.0.1:{port}", "insecure": True}
    config = {"superlink": {"default": "fedsim", "fedsim": connection}}
    (home / "config.toml").write_text(tomli_w.dumps(config), "utf-8")
    return home, env


def superlink_command(port: int, *, simulation: bool) -> list[str]:
    """``flower-superlink`` on loopback; apps run from the installed environment."""
    return [
        _executable("flower-superlink"),
        "--insecure",
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
    on_poll: Callable[[], None] = lambda: None,
    poll_interval: float = 0.5,
) -> tuple[str | None, str | None]:
    """Start a private SuperLink, submit the app with run-config ``config`` and
    wait for it; stop every process started, whatever happens.

    Returns ``(status, reason)``: ``(None, None)`` when the app ended by itself
    (the run directories say how), else how it ended (``failed`` with the
    reason, ``interrupted``).
    """
    logs.mkdir(parents=True, exist_ok=True)
    port = free_port()
    home, env = flower_home(port)
    write_app(home / "app", config, description)
    superlink: subprocess.Popen[bytes] | None = None
    submit: subprocess.Popen[bytes] | None = None
    status: str | None = None
    reason: str | None = None
    seen: dict[int, psutil.Process] = {}  # everything ever started under it
    try:
        with _terminate_as_interrupt():
            superlink = spawn(
                superlink_command(port, simulation=True), env, logs / "superlink.log"
            )
            wait_healthy(superlink, port, logs / "superlink.log")
            submit = spawn(
                submit_command(home / "app", federation), env, logs / "flower.log"
            )
            while submit.poll() is None:
                seen.update((p.pid, p) for p in descendants(superlink.pid))
                on_poll()
                if superlink.poll() is not None:
                    status = "failed"
                    reason = "the SuperLink exited unexpectedly; see logs/superlink.log"
                    break
                time.sleep(poll_interval)
            on_poll()
    except KeyboardInterrupt:
        status, reason = "interrupted", "interrupted by the user (Ctrl-C or SIGTERM)"
    except SimulationError as err:
        status, reason = "failed", str(err)
    except Exception as err:  # never leave a run directory saying "running"
        status, reason = "failed", f"fedsim: {type(err).__name__}: {err}"
    finally:
        if superlink is not None:
            seen.update((p.pid, p) for p in descendants(superlink.pid))
        for proc in (submit, superlink):
            if proc is not None:
                stop_tree(proc.pid)
        # what was started under the SuperLink but left its tree (re-parented)
        stop_processes(seen.values())
        shutil.rmtree(home, ignore_errors=True)
    return status, reason


def settle(
    run_dir: Path, status: str | None, reason: str | None, logs: Path
) -> Outcome:
    """How the run in ``run_dir`` ended, written into its ``summary.json``.

    ``status``/``reason`` from :func:`launch` win; otherwise a run that still
    says ``running`` (or never started) failed, with the log's tail as reason.
    """
    summary = read_summary(run_dir)
    if status is None:
        status = summary.get("status", "failed")
        if status == "running" or not summary:
            status = "failed"
            reason = (
                "the ServerApp ended without finishing; see logs/flower.log:\n"
                + _log_tail(logs / "flower.log")
            )
    elif summary.get("status") in ("completed", "stopped"):
        status, reason = summary["status"], summary.get("reason")
    if reason is not None or summary.get("status") != status:
        summary.update(status=status, reason=reason or summary.get("reason"))
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
    status, reason = launch(
        {**run_config_of(exp, run_dir, resume=resume), ASSIGN_KEY: True},
        federation_config(exp),
        logs,
        description=f"fedsim run {exp.name}",
        on_poll=on_poll,
        poll_interval=poll_interval,
    )
    return settle(run_dir, status, reason, logs)


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
    status, reason = launch(
        {SWEEP_KEY: json.dumps(entries), ASSIGN_KEY: True},
        federation,
        logs,
        description=f"fedsim sweep {first.name}",
        on_poll=on_poll,
        poll_interval=poll_interval,
    )
    return [settle(run_dir, status, reason, logs) for _, run_dir in runs]


def wait_healthy(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    """Wait until the SuperLink on ``port`` answers its health check."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    url = f"http://127.0.0.1:{port}/health"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SimulationError(
                f"flower-superlink exited with code {proc.returncode}:\n"
                + _log_tail(log)
            )
        with suppress(OSError), urllib.request.urlopen(url, timeout=1) as response:
            if response.status == 200:
                return
        time.sleep(0.1)
    raise SimulationError(f"flower-superlink not ready after {STARTUP_TIMEOUT:.0f} s")
