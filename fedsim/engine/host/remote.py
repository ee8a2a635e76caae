"""Runs on an existing SuperLink (``fedsim run --superlink HOST:PORT``).

The SuperLink and its SuperNodes run elsewhere (docker/compose.yaml, other hosts);
fedsim only submits the generated Flower App with ``flwr run`` through a private
``FLWR_HOME`` whose one connection is that SuperLink (TLS with the given root
certificates, the system's trust store, or plain text when asked), follows the run
directory for progress when the SuperLink's host shares it (the Compose volume, a
network file system, the same machine), and stops the remote run when interrupted.

SuperNode authentication is Flower's: the SuperLink runs with
``--enable-supernode-auth``, each SuperNode with ``--auth-supernode-private-key``,
and the public keys are registered through the Control API
(:func:`register_supernode`, ``fedsim supernodes --register``).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsim.core.errors import ConfigError
from fedsim.core.experiment import Experiment
from fedsim.core.loading import RUN_DIR_KEY
from fedsim.core.rundir import SUMMARY_FILE
from fedsim.engine.host.lifeline import stop_signals
from fedsim.engine.host.local_simulation import (
    LOGS_DIR,
    Outcome,
    run_config_of,
    settle,
    write_app,
)
from fedsim.engine.host.processes import stop_tree
from fedsim.engine.host.superlink import (
    SimulationError,
    executable,
    flower_home,
    spawn,
)

_ADDRESS = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):([0-9]{1,5})$")
_RUN_ID = re.compile(r"Successfully started run (\d+)")
FLWR_TIMEOUT = 60.0


@dataclass(frozen=True)
class Connection:
    """How to reach a SuperLink: its address and how to trust it.

    ``root_certificates`` (a PEM CA bundle) verifies the SuperLink's TLS
    certificate; without it the system's trust store does; ``insecure`` turns
    TLS off (plain text, only when asked for).
    """

    address: str
    root_certificates: Path | None = None
    insecure: bool = False

    def __post_init__(self) -> None:
        match = _ADDRESS.match(self.address)
        if not match or not 0 < int(match.group(2)) < 65536:
            raise ConfigError(
                f"--superlink: {self.address!r} is not HOST:PORT (e.g. 127.0.0.1:9093)"
            )
        if self.insecure and self.root_certificates is not None:
            raise ConfigError(
                "--root-certificates: not with --insecure (TLS is either on or off)"
            )
        if self.root_certificates is not None and not self.root_certificates.is_file():
            raise ConfigError(
                f"--root-certificates: {str(self.root_certificates)!r} is not a file"
            )

    def toml(self) -> dict[str, Any]:
        """The ``[superlink.<name>]`` table of Flower's ``config.toml``."""
        table: dict[str, Any] = {"address": self.address}
        if self.insecure:
            table["insecure"] = True
        elif self.root_certificates is not None:
            table["root-certificates"] = str(self.root_certificates.resolve())
        return table


def flwr(connection: Connection, *args: str) -> subprocess.CompletedProcess[str]:
    """``flwr ARGS... fedsim`` against ``connection``, output captured."""
    home, env = flower_home(connection.toml())
    try:
        return subprocess.run(
            [executable("flwr"), *args, "fedsim"],
            env=env,
            capture_output=True,
            text=True,
            timeout=FLWR_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as err:
        raise SimulationError(
            f"flwr {args[0]}: no answer from {connection.address} "
            f"in {FLWR_TIMEOUT:.0f} s"
        ) from err
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _json_reply(done: subprocess.CompletedProcess[str], what: str) -> dict[str, Any]:
    """The JSON object ``flwr ... --format json`` printed, or why there is none."""
    text = done.stdout
    start = 0 if text.startswith("{") else text.find("\n{") + 1
    if start or text.startswith("{"):
        with suppress(ValueError):
            reply: dict[str, Any] = json.JSONDecoder().raw_decode(text, start)[0]
            if reply.get("success", True):
                return reply
            message = str(reply.get("error-message", "")).strip().splitlines()
            raise SimulationError(f"{what}: {message[-1] if message else text}")
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    raise SimulationError(f"{what} failed (exit {done.returncode}): {' '.join(tail)}")


def supernodes(connection: Connection) -> list[dict[str, Any]]:
    """The SuperNodes the SuperLink knows (``node-id``, ``status``: ``online``
    for activated ones, ``registered``, ``offline``...)."""
    reply = _json_reply(
        flwr(connection, "supernode", "ls", "--format", "json"), "flwr supernode ls"
    )
    return list(reply.get("nodes", []))


def register_supernode(connection: Connection, public_key: Path) -> int:
    """Register a SuperNode's public key (OpenSSH ECDSA, a NIST curve) with a
    SuperLink that runs with ``--enable-supernode-auth``; returns its node ID."""
    if not public_key.is_file():
        raise ConfigError(f"--register: {str(public_key)!r} is not a file")
    reply = _json_reply(
        flwr(
            connection,
            "supernode",
            "register",
            str(public_key.resolve()),
            "--format",
            "json",
        ),
        f"registering {public_key}",
    )
    return int(reply["node-id"])


def _run_id(log: Path) -> int | None:
    try:
        found = _RUN_ID.search(log.read_text("utf-8", errors="replace"))
    except OSError:
        return None
    return int(found.group(1)) if found else None


def submit(
    config: dict[str, Any],
    logs: Path,
    connection: Connection,
    *,
    description: str,
    on_poll: Callable[[], None] = lambda: None,
    poll_interval: float = 0.5,
) -> tuple[str | None, str | None]:
    """Submit the app with run-config ``config`` to the SuperLink and follow it
    to the end (``flwr run --stream``, its output in ``logs/flower.log``).

    Returns ``(status, reason)`` as
    :func:`fedsim.engine.host.local_simulation.submit_and_follow` does.
    An interrupt stops the run on the SuperLink (``flwr stop``) too.
    """
    logs.mkdir(parents=True, exist_ok=True)
    home, env = flower_home(connection.toml())
    write_app(home / "app", config, description)
    log = logs / "flower.log"
    proc: subprocess.Popen[bytes] | None = None
    status: str | None = None
    reason: str | None = None
    with stop_signals():
        try:
            command = [executable("flwr"), "run", str(home / "app"), "fedsim"]
            proc = spawn([*command, "--stream"], env, log)
            while proc.poll() is None:
                on_poll()
                time.sleep(poll_interval)
            on_poll()
            if proc.returncode != 0 and _run_id(log) is None:
                status = "failed"
                reason = (
                    f"flwr run could not submit to {connection.address} "
                    f"(exit {proc.returncode}); see logs/flower.log"
                )
        except KeyboardInterrupt:
            status = "interrupted"
            reason = "interrupted by the user (Ctrl-C or SIGTERM)"
            run_id = _run_id(log)
            if run_id is not None:
                subprocess.run(
                    [executable("flwr"), "stop", str(run_id), "fedsim"],
                    env=env,
                    capture_output=True,
                    timeout=FLWR_TIMEOUT,
                    check=False,
                )
        except Exception as err:  # never leave a run directory saying "running"
            status, reason = "failed", f"fedsim: {type(err).__name__}: {err}"
        finally:
            if proc is not None:
                stop_tree(proc.pid)
            shutil.rmtree(home, ignore_errors=True)
    return status, reason


def run_remote(
    exp: Experiment,
    run_dir: Path,
    connection: Connection,
    *,
    remote_dir: Path | None = None,
    on_poll: Callable[[], None] = lambda: None,
    poll_interval: float = 0.5,
) -> Outcome:
    """Run ``exp`` on the SuperLink of ``connection``; the ServerApp writes to
    ``remote_dir`` (``run_dir`` as its host sees it; default: the same path).

    When the run directory is not shared, the metrics stay on the SuperLink's
    host and the outcome says so (the streamed log is in ``logs/flower.log``).
    """
    logs = run_dir / LOGS_DIR
    config = run_config_of(exp, run_dir)
    if remote_dir is not None:
        config[RUN_DIR_KEY] = str(remote_dir)
    status, reason = submit(
        config,
        logs,
        connection,
        description=f"fedsim run {exp.name}",
        on_poll=on_poll,
        poll_interval=poll_interval,
    )
    if status is None and not (run_dir / SUMMARY_FILE).exists():
        status = "failed"
        reason = (
            f"nothing reached {run_dir}: the ServerApp writes to "
            f"{config[RUN_DIR_KEY]} on the SuperLink's host; share that directory "
            "(--remote-out names it as that host sees it) or see logs/flower.log"
        )
    return settle(run_dir, status, reason, logs, exp)
