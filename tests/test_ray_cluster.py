"""A simulation attached to an existing Ray cluster: two Ray nodes on this
host (``ray start --head`` and ``ray start --address``, their own temp dir),
a 2-round, 4-client FedAvg + DP-SGD experiment run on it through the CLI.

Checks: both nodes served clients (``summary.json``'s ``placement``); the
metrics equal the same experiment run locally (every non-timing row,
bit-identical); the cluster is still up after fedsim exits, with all its
resources free (no actor or task of fedsim's left); a run interrupted on the
cluster and resumed there equals the uninterrupted one (DP-SGD's per-client
accountant is client state: it travels with the messages). The cluster's
processes are stopped at the end, by the PIDs this test started, whatever
happened.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from fedsim.core.loading import load_experiment
from fedsim.core.rundir import SUMMARY_FILE
from fedsim.engine.host.processes import free_port, stop_processes, stop_tree
from fedsim.engine.server import server_app
from fedsim.engine.server.run_recorder import create_run_dir
from tests.runs import fedsim, sets
from tests.test_resume import comparable, simulate

pytestmark = pytest.mark.slow

EXPERIMENT = (
    "rounds=2",
    "federation.clients=4",
    "data.dataset=synthetic",
    "data.size=200",
    "model.name=mlp",
    "model.hidden=8",
    "privacy.mechanism=dp-sgd",
    "privacy.noise-multiplier=1.0",
    "privacy.target-epsilon=0",
)

#: What a driver of the cluster prints: its live nodes and free resources.
_LOOK = (
    "import json, sys, ray\n"
    "ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False)\n"
    "nodes = sorted(n['NodeID'] for n in ray.nodes() if n['Alive'])\n"
    "print(json.dumps([nodes, ray.cluster_resources().get('CPU'),\n"
    "                  ray.available_resources().get('CPU')]))\n"
    "ray.shutdown()\n"
)


def look(address: str) -> tuple[list[str], float, float]:
    """(live node ids, CPUs, free CPUs) of the cluster at ``address``."""
    out = subprocess.run(
        [sys.executable, "-c", _LOOK, address],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    nodes, cpus, free = json.loads(out.stdout.strip().splitlines()[-1])
    return nodes, cpus, free


def _ray_start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [str(Path(sys.executable).with_name("ray")), "start", *args, "--block"],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


@contextmanager
def two_node_cluster() -> Iterator[tuple[str, list[psutil.Process]]]:
    """A head and a worker node (1 CPU each) on this host, their own temp dir
    (so no ``ray.init()`` elsewhere finds them); yields the address and the
    two ``ray start --block`` processes. Stopped at the end, whatever
    happened: every process under them, and any other of the temp dir."""
    temp = Path(tempfile.mkdtemp(prefix="fsr-", dir="/tmp"))  # sockets: short
    port = free_port()
    address = f"127.0.0.1:{port}"
    started: list[subprocess.Popen[bytes]] = []
    try:
        started.append(
            _ray_start(
                [
                    "--head",
                    "--node-ip-address=127.0.0.1",
                    f"--port={port}",
                    "--num-cpus=1",
                    "--num-gpus=0",
                    '--resources={"head": 1}',
                    "--include-dashboard=false",
                    f"--temp-dir={temp}",
                ],
                temp / "head.log",
            )
        )
        deadline = time.monotonic() + 120
        while not (temp / "ray_current_cluster").exists():  # the head is up
            assert started[0].poll() is None, (temp / "head.log").read_text()
            assert time.monotonic() < deadline, "the head did not start"
            time.sleep(0.5)
        started.append(
            _ray_start(
                [
                    f"--address={address}",
                    "--num-cpus=1",
                    "--num-gpus=0",
                    '--resources={"worker": 1}',
                ],
                temp / "worker.log",
            )
        )
        while len(look(address)[0]) < 2:
            assert started[1].poll() is None, (temp / "worker.log").read_text()
            assert time.monotonic() < deadline, "the worker node did not join"
            time.sleep(1)
        yield address, [psutil.Process(p.pid) for p in started]
    finally:
        for proc in reversed(started):
            stop_tree(proc.pid, timeout=10)
        stop_processes(
            p
            for p in psutil.process_iter(["cmdline"])
            if any(str(temp) in arg for arg in p.info["cmdline"] or ())
        )
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[tuple[str, list[psutil.Process]]]:
    with two_node_cluster() as cluster:
        yield cluster


def cluster_processes(roots: list[psutil.Process]) -> list[str]:
    """The names of the cluster's processes now (its nodes' trees)."""
    names = []
    for root in roots:
        for proc in [root, *root.children(recursive=True)]:
            try:
                names.append(proc.name())
            except psutil.Error:
                continue
    return names


def test_a_run_attached_to_a_two_node_cluster(two_nodes, tmp_path, task_identity):
    address, roots = two_nodes
    nodes, cpus, _ = look(address)
    # the same experiment run here: the ServerApp and ClientApp in-process
    # (tests/test_resume.py: a local CLI run gives these very rows)
    exp = load_experiment(None, list(EXPERIMENT))
    local = create_run_dir(tmp_path / "local", exp)
    simulate(exp, local)

    attached = fedsim(
        "run",
        "--ray-address",
        address,
        *sets(*EXPERIMENT),
        out=tmp_path / "attached",
        timeout=900,
    )
    assert attached.returncode == 0, attached.stdout + attached.stderr
    summary = json.loads((attached.run_dir / SUMMARY_FILE).read_text())
    placement = summary["placement"]
    assert sorted(placement["nodes"]) == nodes  # both nodes served clients
    for rnd in ("1", "2"):
        assert sum(placement["rounds"][rnd]["train"].values()) == 4
    assert comparable(attached.run_dir).equals(comparable(local))
    config = (attached.run_dir / "config.toml").read_text()
    assert f'ray-address = "{address}"' in config

    # the cluster is still up, and nothing of fedsim's is left on it
    assert all(root.is_running() for root in roots)
    deadline = time.monotonic() + 60
    while (left := look(address)) != (nodes, cpus, cpus):
        assert time.monotonic() < deadline, left
        time.sleep(1)
    assert "ray::ClientAppA" not in cluster_processes(roots)

    # interrupted on the cluster in round 2, resumed there: the same metrics
    env = {**os.environ, server_app.CRASH_IN_ROUND: "2"}
    crashed = fedsim(
        "run",
        "--ray-address",
        address,
        *sets(*EXPERIMENT),
        out=tmp_path / "crashed",
        env=env,
        timeout=900,
    )
    assert crashed.returncode == 1, crashed.stdout + crashed.stderr
    run_dir = crashed.run_dir
    resumed = fedsim(
        "run", "--resume", str(run_dir), out=tmp_path / "unused", timeout=900
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    assert summary["status"] == "completed" and summary["resumed"]
    assert sorted(summary["placement"]["rounds"]) == ["1", "2"]
    got = comparable(run_dir)
    assert "epsilon" in set(got["metric"])
    assert got.equals(comparable(local))
    assert all(root.is_running() for root in roots)
