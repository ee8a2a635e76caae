"""Flower's SuperLink as fedsim starts it: commands, environment, health.

A private SuperLink (:class:`PrivateSuperLink`) runs on a free loopback port
with its own ``FLWR_HOME``. The CLI starts it *before* it validates an
experiment (which imports PyTorch and builds the data and the model), so the
two start-ups overlap; a failed validation stops it again and leaves nothing
behind.
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psutil
import tomli_w

from fedsim.engine.host import cluster
from fedsim.engine.host.lifeline import Lifeline, die_with_parent
from fedsim.engine.host.processes import free_port, stop_processes, stop_tree
from fedsim.engine.server import simulation_process

STARTUP_TIMEOUT = 60.0
T = TypeVar("T")


class SimulationError(RuntimeError):
    """The simulation runtime could not be started."""


def executable(name: str) -> str:
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


def log_tail(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of a log ('' where it cannot be read)."""
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


def flower_home(
    connection: dict[str, Any], ray_address: str = ""
) -> tuple[Path, dict[str, str]]:
    """A private ``FLWR_HOME`` whose default connection ``fedsim`` is
    ``connection`` (a ``[superlink.<name>]`` table: ``address``, ``insecure`` or
    ``root-certificates``), and the environment for Flower's commands (its
    simulations run on a loopback Ray, or on the cluster at ``ray_address``:
    :func:`fedsim.engine.host.cluster.environment`)."""
    home = Path(tempfile.mkdtemp(prefix="fedsim-flwr-"))
    launcher = simulation_process.write_launcher(home / "bin")
    env = {
        **cluster.environment(os.environ, ray_address),
        "FLWR_HOME": str(home),
        "PATH": os.pathsep.join([str(launcher.parent), environment_path()]),
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
        executable("flower-superlink"),
        *security,
        *(["--enable-supernode-auth"] if supernode_auth else []),
        *(["--simulation"] if simulation else []),
        "--disable-runtime-dependency-installation",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


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
                + log_tail(log)
            )
        with (
            suppress(OSError),
            urllib.request.urlopen(url, timeout=1, context=context) as response,
        ):
            if response.status == 200:
                return
        time.sleep(0.1)
    raise SimulationError(f"flower-superlink not ready after {STARTUP_TIMEOUT:.0f} s")


class PrivateSuperLink:
    """A SuperLink in simulation mode on a free loopback port, with its own
    ``FLWR_HOME`` (``home``; ``env`` for Flower's commands) and log
    (``home/superlink.log``, copied into a run's logs on :meth:`close`).

    Started on construction and watched by a :class:`Lifeline`, so it is stopped
    should the starting process die; :meth:`close` stops it and removes its
    home (idempotent). Its simulations run on a private loopback Ray, or on
    the existing cluster at ``ray_address``.
    """

    def __init__(self, ray_address: str = "") -> None:
        self.port = free_port()
        self.ray_address = ray_address
        self.home, self.env = flower_home(loopback(self.port), ray_address)
        self.log = self.home / "superlink.log"
        self.lifeline = Lifeline()
        self.lifeline.remove(self.home)  # also when the starting process dies
        try:
            self.process = spawn(
                superlink_command(self.port, simulation=True), self.env, self.log
            )
        except BaseException:
            self.lifeline.close()
            shutil.rmtree(self.home, ignore_errors=True)
            raise
        self.lifeline.watch(self.process.pid)
        self._closed = False

    def wait_healthy(self) -> None:
        """Wait until it answers (:func:`wait_healthy`)."""
        wait_healthy(self.process, self.port, self.log)

    def close(
        self,
        grace: float = 15.0,
        *,
        leftovers: Iterable[psutil.Process] = (),
        log_to: Path | None = None,
    ) -> None:
        """Stop it (``grace`` seconds to exit) and ``leftovers`` (processes
        started under it that left its tree), append its log to ``log_to``,
        remove its home. Idempotent."""
        if self._closed:
            return
        self._closed = True
        stop_tree(self.process.pid, grace)
        stop_processes(leftovers)
        if log_to is not None:
            with suppress(OSError), open(log_to, "ab") as out:
                out.write(self.log.read_bytes())
        self.lifeline.close()
        shutil.rmtree(self.home, ignore_errors=True)


def start_during(
    work: Callable[[], T], ray_address: str = ""
) -> tuple[PrivateSuperLink, T]:
    """Start a :class:`PrivateSuperLink` (on ``ray_address``) and do ``work``
    (e.g. the pre-run checks) while it starts up; should ``work`` fail, stop
    it again."""
    link = PrivateSuperLink(ray_address)
    try:
        return link, work()
    except BaseException:
        link.close(grace=1.0)
        raise
