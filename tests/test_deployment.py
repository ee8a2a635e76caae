"""The same apps on Flower's deployment runtime: a real SuperLink and SuperNodes on
127.0.0.1 (the topology of docker/compose.yaml, secured as a multi-host deployment
is: TLS from docker/certs.sh's CA, authenticated SuperNodes), started and stopped
by PID; the run is submitted with ``fedsim run --superlink``."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from fedsim.core.rundir import read_metrics
from fedsim.engine.host.processes import free_port, stop_tree
from fedsim.engine.host.remote import Connection, register_supernode, supernodes
from fedsim.engine.host.superlink import (
    Tls,
    executable,
    flower_home,
    loopback,
    spawn,
    superlink_command,
    wait_healthy,
)
from tests.conftest import fedsim, sets

CERTS_SCRIPT = Path(__file__).resolve().parents[1] / "docker" / "certs.sh"


def supernode_command(
    port: int, partition: int, ca: Path, key: Path | None
) -> list[str]:
    """A SuperNode of a TLS SuperLink, authenticated with ``key`` when given."""
    return [
        executable("flower-supernode"),
        "--root-certificates",
        str(ca),
        "--superlink",
        f"127.0.0.1:{port}",
        *(["--auth-supernode-private-key", str(key)] if key else []),
        "--node-config",
        f"partition-id={partition} num-partitions=2",
        "--max-retries",
        "0",
        "--host",
        "127.0.0.1",
        "--port",
        str(free_port()),
    ]


def wait_online(connection: Connection, count: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        nodes = supernodes(connection)
        if sum(n["status"] == "online" for n in nodes) >= count:
            return
        time.sleep(0.2)
    raise AssertionError(f"fewer than {count} SuperNodes online: {nodes}")


@pytest.mark.slow
@pytest.mark.skipif(
    not (shutil.which("openssl") and shutil.which("ssh-keygen")),
    reason="docker/certs.sh needs openssl and ssh-keygen",
)
def test_tls_superlink_with_authenticated_supernodes_runs_fedavg(
    tmp_path: Path,
) -> None:
    certs = tmp_path / "certs"
    subprocess.run(["bash", str(CERTS_SCRIPT), str(certs), "3"], check=True)
    ca = certs / "ca.crt"
    tls = Tls(certs / "superlink.crt", certs / "superlink.key", ca)
    logs = tmp_path / "logs"
    logs.mkdir()
    port = free_port()
    home, env = flower_home(loopback(port))
    connection = Connection(f"127.0.0.1:{port}", root_certificates=ca)
    procs = []
    try:
        command = superlink_command(
            port, simulation=False, tls=tls, supernode_auth=True
        )
        link = spawn(command, env, logs / "link.log")
        procs.append(link)
        wait_healthy(link, port, logs / "link.log", tls)
        # plain text to a TLS SuperLink is refused
        plain = Connection(f"127.0.0.1:{port}", insecure=True)
        with pytest.raises(RuntimeError):
            supernodes(plain)
        for pid in range(2):
            register_supernode(connection, certs / f"supernode-{pid}.pub")
            node = supernode_command(port, pid, ca, certs / f"supernode-{pid}")
            procs.append(spawn(node, env, logs / f"node{pid}.log"))
        # no key, and a key nobody registered: both refused, neither admitted
        strangers = [
            spawn(supernode_command(port, 0, ca, None), env, logs / "nokey.log"),
            spawn(
                supernode_command(port, 1, ca, certs / "supernode-2"),
                env,
                logs / "unregistered.log",
            ),
        ]
        procs.extend(strangers)
        wait_online(connection, 2)
        for proc in strangers:
            assert proc.wait(timeout=60) != 0
        nokey = (logs / "nokey.log").read_text()
        assert "must be registered" in nokey, nokey[-2000:]
        unregistered = (logs / "unregistered.log").read_text()
        assert "Failed to activate SuperNode" in unregistered, unregistered[-2000:]
        nodes = supernodes(connection)
        assert sum(n["status"] == "online" for n in nodes) == 2, nodes

        # no client evaluation: on the deployment runtime every message starts
        # a ClientApp process (torch, the data), and nothing here reads it
        overrides = [
            "rounds=1",
            "federation.clients=2",
            "model.name=mlp",
            "federation.fraction-evaluate=0",
        ]
        result = fedsim(
            "run",
            *sets(*overrides, "name=deployed"),
            "--superlink",
            f"127.0.0.1:{port}",
            "--root-certificates",
            str(ca),
            out=tmp_path / "runs",
            timeout=420,
        )
    finally:
        for proc in reversed(procs):
            stop_tree(proc.pid)
        shutil.rmtree(home, ignore_errors=True)
    assert all(p.poll() is not None for p in procs)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "round   1/1" in result.stdout  # progress, read from the run directory
    assert "completed" in result.stdout
    frame = read_metrics(result.run_dir)
    assert frame is not None
    clients = frame[(frame["phase"] == "train") & frame["client"].notna()]
    assert sorted(clients["client"].unique()) == [0, 1]
    server = frame[(frame["phase"] == "server") & (frame["metric"] == "accuracy")]
    assert sorted(server["round"]) == [0, 1]
    assert server["value"].iloc[-1] > server["value"].iloc[0]
