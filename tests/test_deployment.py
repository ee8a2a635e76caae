"""The same apps on Flower's deployment runtime: a real SuperLink and SuperNodes on
127.0.0.1 (the topology of docker/compose.yaml), started and stopped by PID."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from fedsim.core.loading import load_experiment
from fedsim.core.rundir import read_metrics
from fedsim.engine.recorder import create_run_dir
from fedsim.engine.runner import (
    _executable,
    flower_home,
    free_port,
    run_config_of,
    spawn,
    stop_tree,
    submit_command,
    superlink_command,
    wait_healthy,
    write_app,
)

pytestmark = pytest.mark.slow


def test_superlink_and_two_supernodes_run_fedavg(tmp_path: Path) -> None:
    exp = load_experiment(
        None, ["rounds=1", "federation.clients=2", "model.name=mlp", "name=deployed"]
    )
    run_dir = create_run_dir(tmp_path / "runs", exp)
    logs = tmp_path / "logs"
    logs.mkdir()
    port = free_port()
    home, env = flower_home(port)
    write_app(home / "app", run_config_of(exp, run_dir), "deployment test")
    procs = []
    try:
        link = spawn(superlink_command(port, simulation=False), env, logs / "link.log")
        procs.append(link)
        wait_healthy(link, port, logs / "link.log")
        for pid in range(2):
            node = [
                _executable("flower-supernode"),
                "--insecure",
                "--superlink",
                f"127.0.0.1:{port}",
                "--node-config",
                f"partition-id={pid} num-partitions=2",
                "--host",
                "127.0.0.1",
                "--port",
                str(free_port()),
            ]
            procs.append(spawn(node, env, logs / f"node{pid}.log"))
        submit = spawn(submit_command(home / "app"), env, logs / "run.log")
        procs.append(submit)
        deadline = time.monotonic() + 240
        while submit.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "completed", (logs / "run.log").read_text()[-3000:]
    finally:
        for proc in reversed(procs):
            stop_tree(proc.pid)
        shutil.rmtree(home, ignore_errors=True)
    assert all(p.poll() is not None for p in procs)
    frame = read_metrics(run_dir)
    assert frame is not None
    clients = frame[(frame["phase"] == "train") & frame["client"].notna()]
    assert sorted(clients["client"].unique()) == [0, 1]
    server = frame[(frame["phase"] == "server") & (frame["metric"] == "accuracy")]
    assert sorted(server["round"]) == [0, 1]
    assert server["value"].iloc[-1] > server["value"].iloc[0]
