"""docker/compose.yaml for real: podman + podman-compose build the image, start a
SuperLink and three SuperNodes in containers, and ``fedsim run --superlink``
submits a run from the host; the run directory arrives through the Compose volume.

Not part of the default run (tests/conftest.py deselects it); run it with
``pytest -m compose`` (``.ci/run`` does, after the main suite). It needs root and
the machine preparation of ``../shared/containers/setup.sh``
(``FEDSIM_CONTAINERS_SETUP`` names another script); where that fails, the test is
skipped with the script's reason.
Everything it creates (containers, network) carries its own project name and is
removed by that name, whatever happens.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedsim.core.rundir import read_metrics
from fedsim.engine.host.processes import free_port
from fedsim.engine.host.remote import Connection, supernodes
from tests.conftest import fedsim, sets

pytestmark = pytest.mark.compose

ROOT = Path(__file__).resolve().parents[1]
SETUP = Path(
    os.environ.get(
        "FEDSIM_CONTAINERS_SETUP", ROOT.parent / "shared" / "containers" / "setup.sh"
    )
)
NODES = 3


def step(name: str, started: float) -> None:
    """Print how long a step took (shown with ``pytest -s`` and in CI logs)."""
    print(f"compose step {name}: {time.monotonic() - started:.1f} s", flush=True)


@pytest.fixture(scope="module")
def containers() -> None:
    """The machine can run containers: the setup script says so, or we skip."""
    if not SETUP.is_file():
        pytest.skip(f"no container setup script at {SETUP}")
    started = time.monotonic()
    done = subprocess.run(
        ["bash", str(SETUP)], capture_output=True, text=True, timeout=900
    )
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip().splitlines()
        pytest.skip(f"{SETUP.name} failed: {why[-1] if why else done.returncode}")
    step("setup", started)


class Compose:
    """One Compose project (``podman-compose -p NAME``) and its teardown by name."""

    def __init__(self, name: str, files: list[Path], env: dict[str, str]):
        self.name = name
        self.files = files
        self.env = {**os.environ, **env}

    def __call__(self, *args: str, timeout: float = 600) -> str:
        command = ["podman-compose", "-p", self.name]
        for file in self.files:
            command += ["-f", str(file)]
        done = subprocess.run(
            [*command, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
            cwd=ROOT,
        )
        # podman-compose exits 0 even when a build or a start failed
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout + done.stderr

    def containers(self) -> list[str]:
        label = f"label=io.podman.compose.project={self.name}"
        listed = subprocess.run(
            ["podman", "ps", "-a", "--filter", label, "--format", "{{.Names}}"],
            capture_output=True,
            text=True,
            check=True,
        )
        return listed.stdout.split()

    def logs(self) -> str:
        out = []
        for name in self.containers():
            done = subprocess.run(
                ["podman", "logs", "--tail", "30", name], capture_output=True, text=True
            )
            out.append(f"--- {name}\n{done.stdout[-2500:]}{done.stderr[-2500:]}")
        return "\n".join(out)

    def remove(self) -> None:
        """Containers and the network of this project, by its name."""
        names = self.containers()
        if names:
            subprocess.run(
                ["podman", "rm", "-f", "-t", "5", *names], capture_output=True
            )
        subprocess.run(
            ["podman", "network", "rm", "-f", f"{self.name}_default"],
            capture_output=True,
        )


@pytest.fixture(scope="module")
def image(containers: None) -> None:
    """``fedsim:latest`` built from docker/Dockerfile (the standard index plus the
    machine's pip settings, as here)."""
    started = time.monotonic()
    compose = Compose(
        f"fedsim-build-{os.getpid()}", [ROOT / "docker" / "compose.yaml"], ENV_BUILD
    )
    out = compose("build", "superlink", timeout=3600)
    done = subprocess.run(
        ["podman", "image", "exists", "fedsim:latest"], capture_output=True
    )
    assert done.returncode == 0, out[-3000:]
    step("build", started)


ENV_BUILD = {"TORCH_INDEX": ""}


def wait_online(connection: Connection, compose: Compose, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    nodes: list[dict] = []
    while time.monotonic() < deadline:
        try:
            nodes = supernodes(connection)
        except RuntimeError:  # the SuperLink is still starting
            nodes = []
        if sum(n["status"] == "online" for n in nodes) >= NODES:
            return
        time.sleep(2)
    raise AssertionError(f"{NODES} SuperNodes not online: {nodes}\n{compose.logs()}")


@pytest.fixture(params=["plain", "secure"])
def deployment(
    request: pytest.FixtureRequest, image: None, tmp_path: Path
) -> Iterator[tuple[Compose, Connection, list[str], Path]]:
    """The Compose project up, its SuperNodes online; removed afterwards."""
    secure = request.param == "secure"
    port = free_port()
    runs = tmp_path / "runs"
    runs.mkdir()
    env = {**ENV_BUILD, "FEDSIM_SUPERLINK_PORT": str(port), "FEDSIM_RUNS": str(runs)}
    files = [ROOT / "docker" / "compose.yaml"]
    certs = tmp_path / "certs"
    if secure:
        script = ROOT / "docker" / "certs.sh"
        subprocess.run(["bash", str(script), str(certs), str(NODES)], check=True)
        env["FEDSIM_CERTS"] = str(certs)
        files.append(ROOT / "docker" / "compose.secure.yaml")
        connection = Connection(f"127.0.0.1:{port}", root_certificates=certs / "ca.crt")
        trust = ["--root-certificates", str(certs / "ca.crt")]
    else:
        connection = Connection(f"127.0.0.1:{port}", insecure=True)
        trust = ["--insecure"]
    compose = Compose(f"fedsim-test-{request.param}-{os.getpid()}", files, env)
    try:
        started = time.monotonic()
        compose("up", "-d")
        # every container created (podman-compose exits 0 even when one was not)
        assert len(compose.containers()) == 1 + NODES, compose.logs()
        if secure:
            wait_until_listening(connection, compose)
            keys = [f"--register={certs}/supernode-{n}.pub" for n in range(NODES)]
            address = ["--superlink", connection.address]
            done = fedsim("supernodes", *address, *trust, *keys, out=runs)
            assert done.returncode == 0, done.stdout + done.stderr
            lines = done.stdout.splitlines()
            registered = [line for line in lines if line.startswith("registered ")]
            assert len(registered) == NODES, done.stdout
        wait_online(connection, compose, timeout=300)
        step(f"up ({request.param})", started)
        yield compose, connection, trust, runs
    finally:
        started = time.monotonic()
        print(compose.logs(), flush=True)  # shown when the test fails
        try:
            compose("down", timeout=180)
        except AssertionError:
            pass
        compose.remove()
        step(f"down ({request.param})", started)
        assert compose.containers() == []
        left = subprocess.run(
            ["podman", "network", "exists", f"{compose.name}_default"],
            capture_output=True,
        )
        assert left.returncode != 0, "the Compose network was left behind"


def wait_until_listening(connection: Connection, compose: Compose) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            supernodes(connection)
            return
        except RuntimeError:
            time.sleep(2)
    raise AssertionError(f"the SuperLink does not answer\n{compose.logs()}")


def test_compose_deployment_runs_fedavg(
    deployment: tuple[Compose, Connection, list[str], Path],
) -> None:
    compose, connection, trust, runs = deployment
    if "--root-certificates" in trust:
        # a SuperNode without a registered key is refused (and retried by the
        # restart policy); the three registered ones are the only ones online
        nodes = supernodes(connection)
        assert sum(n["status"] == "online" for n in nodes) == NODES, nodes
        assert len(nodes) == NODES, nodes
        stranger = subprocess.run(
            [
                "podman", "run", "--rm", "--network", f"{compose.name}_default",
                "-v", f"{compose.env['FEDSIM_CERTS']}:/certs:ro", "fedsim:latest",
                "flower-supernode", "--root-certificates", "/certs/ca.crt",
                "--superlink", "superlink:9093", "--max-retries", "0",
                "--node-config", "partition-id=0 num-partitions=3",
            ],
            capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert stranger.returncode != 0
        assert "must be registered" in stranger.stdout + stranger.stderr
    started = time.monotonic()
    overrides = ["rounds=2", "federation.clients=3", "model.name=mlp", "name=compose"]
    result = fedsim(
        "run",
        *sets(*overrides),
        "--superlink",
        connection.address,
        *trust,
        "--remote-out",
        "/work/runs",
        out=runs,
        timeout=900,
    )
    step("run", started)
    print(result.stdout, flush=True)
    assert result.returncode == 0, result.stdout + result.stderr + compose.logs()
    assert "round   2/2" in result.stdout
    frame = read_metrics(result.run_dir)
    assert frame is not None
    trained = frame[(frame["phase"] == "train") & (frame["metric"] == "examples")]
    per_round = trained[trained["client"].notna()].groupby("round")["client"]
    assert {r: sorted(c) for r, c in per_round} == {1: [0, 1, 2], 2: [0, 1, 2]}
    server = frame[(frame["phase"] == "server") & (frame["metric"] == "accuracy")]
    assert sorted(server["round"]) == [0, 1, 2]
    assert server["value"].iloc[-1] > server["value"].iloc[0]
