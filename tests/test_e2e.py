"""End to end through the CLI, Flower's simulation runtime and Ray."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
import torch

from fedsim.core.loading import load_experiment
from fedsim.core.rundir import read_metrics
from fedsim.core.seeding import derive_seed
from fedsim.learn.base import build_model
from fedsim.learn.data import federated_data
from fedsim.learn.training import evaluate
from tests.runs import SMALL, CliRun, SharedRun, alive, descendants, sets

pytestmark = pytest.mark.slow


def metrics(run_dir: Path) -> pd.DataFrame:
    frame = read_metrics(run_dir)
    assert frame is not None
    return frame


def test_small_run_writes_the_run_directory(small_run: CliRun) -> None:
    run_dir = small_run.run_dir
    assert (run_dir / "config.toml").is_file() and (run_dir / "checkpoints").is_dir()
    assert "run directory:" in small_run.stdout and str(run_dir) in small_run.stdout
    assert "round   3/3" in small_run.stdout  # progress lines
    exp = load_experiment(run_dir / "config.toml")
    assert exp == load_experiment(None, SMALL)

    frame = metrics(run_dir)
    assert list(frame.columns) == ["round", "client", "phase", "metric", "value"]
    assert str(frame["client"].dtype) == "Int64"
    server = frame[frame["phase"] == "server"]
    assert sorted(server["round"].unique()) == [0, 1, 2, 3]
    assert server["client"].isna().all()

    train = frame[(frame["phase"] == "train") & frame["client"].notna()]
    per = train.pivot_table(index=["round", "client"], columns="metric", values="value")
    assert sorted(per.index.get_level_values("client").unique()) == [0, 1, 2, 3]
    for name in ("loss", "examples", "seconds", "bytes-up", "bytes-down"):
        assert per[name].notna().all(), name
    # bytes: the real size of the model arrays, both ways
    data = federated_data(exp.data, exp.federation.clients, exp.seed)
    model = build_model(exp.model, data.info, exp.seed)
    raw = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    assert (per["bytes-up"] == per["bytes-down"]).all()
    assert ((per["bytes-up"] >= raw) & (per["bytes-up"] < raw + 1024)).all()
    # each client trains on its own local train split, every round
    sizes = {pid: len(data.client(pid).train) for pid in range(4)}
    for (_, pid), row in per.iterrows():
        assert row["examples"] == sizes[pid]

    agg = frame[(frame["phase"] == "train") & frame["client"].isna()]
    agg = agg.pivot(index="round", columns="metric", values="value")
    assert (agg["examples"] == sum(sizes.values())).all()
    weighted = (per["loss"] * per["examples"]).groupby("round").sum() / per[
        "examples"
    ].groupby("round").sum()
    np.testing.assert_allclose(agg["loss"], weighted, rtol=1e-9)

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == 3
    assert summary["seed"] == 0 and summary["versions"]["flwr"].startswith("1.41")
    final = server[server["round"] == 3].set_index("metric")["value"]
    assert summary["final"]["accuracy"] == final["accuracy"]


def test_checkpoint_reproduces_the_server_accuracy(small_run: CliRun) -> None:
    """The saved global model, evaluated here, gives the recorded accuracy."""
    run_dir = small_run.run_dir
    exp = load_experiment(run_dir / "config.toml")
    data = federated_data(exp.data, exp.federation.clients, exp.seed)
    model = build_model(exp.model, data.info, exp.seed)
    with np.load(run_dir / "checkpoints" / "global.npz") as saved:
        assert int(saved["__round__"]) == 3
        model.load_state_dict(
            {k: torch.from_numpy(saved[k]) for k in model.state_dict()}
        )
    stats = evaluate(model, data.test, device=torch.device("cpu"))
    server = metrics(run_dir)
    recorded = server[(server["phase"] == "server") & (server["round"] == 3)]
    accuracy = recorded.set_index("metric")["value"]["accuracy"]
    assert stats.accuracy == pytest.approx(accuracy, abs=1e-12)
    assert stats.accuracy > 0.5  # three rounds already learn something


def failing_setup(
    rate: float, clients: int, rounds: int
) -> tuple[int, set[tuple[int, int]]]:
    """A seed where some clients fail but every round keeps a survivor."""
    for seed in range(100):
        failed = {
            (r, p)
            for r in range(1, rounds + 1)
            for p in range(clients)
            if np.random.default_rng(derive_seed(seed, "failure", r, p)).random() < rate
        }
        per_round = [
            sum((r, p) in failed for p in range(clients)) for r in range(1, rounds + 1)
        ]
        if failed and max(per_round) < clients:
            return seed, failed
    raise AssertionError("no suitable seed")


def watch(
    args: list[str], out: Path, interrupt: Callable[[Path], bool] | None = None
) -> tuple[int, set[int], str]:
    """Run the CLI, collect every process it starts, optionally send Ctrl-C."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedsim", *args, "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen: set[int] = set()
    deadline = time.monotonic() + 600  # a shared, loaded machine can be that slow
    interrupted = False
    while proc.poll() is None and time.monotonic() < deadline:
        seen |= descendants(proc.pid)
        if interrupt and not interrupted:
            runs = [p for p in out.glob("*") if p.is_dir()]
            if runs and interrupt(runs[0]):
                seen |= descendants(proc.pid)
                proc.send_signal(signal.SIGINT)
                interrupted = True
                time.sleep(0.5)  # the runner is stopping Ray: an impatient user
                if proc.poll() is None:
                    proc.send_signal(signal.SIGINT)
        time.sleep(0.2)
    stdout, _ = proc.communicate(timeout=120)
    return proc.returncode, seen, stdout


def failing_experiment() -> tuple[tuple[str, ...], set[tuple[int, int]]]:
    """:data:`SMALL` with clients failing at rate 0.3 (a seed where every round
    keeps a survivor), and the (round, partition) pairs that fail. It runs in
    the session's four-client sweep (``tests/conftest.py``)."""
    seed, failed = failing_setup(0.3, 4, 3)
    return (*SMALL, f"seed={seed}", "federation.failure-rate=0.3"), failed


def test_failing_clients_are_recorded_and_the_run_completes(
    four_client_runs: dict[str, SharedRun],
) -> None:
    _, failed = failing_experiment()
    run = four_client_runs["failing"]
    run_dir = run.run_dir
    frame = metrics(run_dir)
    rows = frame[(frame["phase"] == "train") & (frame["metric"] == "failed")]
    assert {(int(r), int(c)) for r, c in zip(rows["round"], rows["client"])} == failed
    agg = frame[(frame["phase"] == "train") & frame["client"].isna()]
    failures = agg[agg["metric"] == "failures"].set_index("round")["value"]
    for rnd in (1, 2, 3):
        assert failures[rnd] == sum(r == rnd for r, _ in failed)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["failures"] == len(failed)
    assert "dropped out" in summary["failure_details"][0]["reason"]
    seen, left = run.sweep.processes, run.sweep.left_behind
    assert seen and not left, "processes left behind after a completed run"


def test_too_few_replies_end_the_run_as_failed(run_cli: Callable[..., CliRun]) -> None:
    result = run_cli(
        overrides=(*SMALL, "federation.failure-rate=0.9", "federation.min-replies=3")
    )
    assert result.returncode == 1
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert "fewer than federation.min-replies = 3" in summary["reason"]
    # the reason, on stderr: one line with the log's path
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("fedsim: run failed: round 1: ")
    assert "min-replies = 3" in line and str(result.run_dir / "logs") in line
    # every failure of the round that ended the run is recorded
    frame = metrics(result.run_dir)
    failed = frame[(frame["metric"] == "failed") & frame["client"].notna()]
    assert summary["failures"] == len(failed) > 0


def test_ctrl_c_stops_every_process(tmp_path: Path) -> None:
    def after_first_round(run_dir: Path) -> bool:
        frame = (
            read_metrics(run_dir) if (run_dir / "metrics.parquet").exists() else None
        )
        return frame is not None and (frame["round"] >= 1).any()

    code, seen, stdout = watch(
        ["run", *sets(*SMALL, "rounds=200")], tmp_path, interrupt=after_first_round
    )
    assert code == 130, stdout
    assert "Traceback" not in stdout  # the second Ctrl-C was ignored
    assert "fedsim: run interrupted: interrupted by the user" in stdout
    assert len(seen) >= 3  # SuperLink, flwr run, the simulation process, Ray...
    assert not alive(seen), f"leaked: {alive(seen)}"
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert read_metrics(run_dir) is not None  # completed rounds stay readable
    config = tomllib.loads((run_dir / "config.toml").read_text())
    assert config["rounds"] == 200


def name_of(proc: psutil.Process) -> str:
    try:
        return str(proc.name())
    except psutil.Error:
        return ""


def test_sigkill_of_the_cli_leaves_nothing_behind(tmp_path: Path) -> None:
    """``kill -9`` of ``fedsim run`` while Ray's actors train: the SuperLink,
    the SuperExec, the simulation process and every Ray process exit within
    seconds (PDEATHSIG and the lifeline watchdog; nothing of the CLI runs)."""
    proc = subprocess.Popen(
        [
            sys.executable,
            *("-m", "fedsim", "run", *sets(*SMALL, "rounds=200")),
            *("--out", str(tmp_path)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    seen: dict[int, psutil.Process] = {}
    training = False
    try:
        deadline = time.monotonic() + 600
        while not training and time.monotonic() < deadline and proc.poll() is None:
            for child in psutil.Process(proc.pid).children(recursive=True):
                seen.setdefault(child.pid, child)
            training = any("ClientAppActor" in name_of(p) for p in seen.values())
            time.sleep(0.2)
        for child in psutil.Process(proc.pid).children(recursive=True):
            seen.setdefault(child.pid, child)
        assert training and proc.poll() is None, "no Ray actor trained before the kill"
        assert len(seen) >= 6  # lifeline, SuperLink, SuperExec, flwr, simulation, Ray
        proc.kill()
        proc.wait()
        gone_by = time.monotonic() + 10
        while time.monotonic() < gone_by and alive(set(seen)):
            time.sleep(0.2)
        left = alive(set(seen))
        assert not left, f"still running 10 s after kill -9: {left}"
    finally:
        proc.kill()
        for child in seen.values():  # only if the test failed
            with contextlib.suppress(psutil.Error):
                child.kill()
