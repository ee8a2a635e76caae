"""TensorBoard and MLflow trackers, read back from their local files."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import SMALL, sets

from fedsim import analysis
from fedsim.analysis import trackers
from fedsim.core.errors import ConfigError
from fedsim.core.loading import load_experiment
from fedsim.core.rundir import RoundSink, Row

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")

from mlflow.tracking import MlflowClient  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import (  # noqa: E402
    EventAccumulator,
)

ROWS: dict[int, list[Row]] = {
    0: [(0, None, "server", "accuracy", 0.125), (0, None, "server", "loss", 2.25)],
    1: [
        (1, 0, "train", "loss", 1.5),  # per-client rows are not logged
        (1, 1, "train", "loss", 1.0),
        (1, None, "train", "loss", 1.25),
        (1, None, "train", "bytes-up", 2048.0),
        (1, None, "server", "accuracy", 0.625),
        (1, None, "server", "loss", 1.125),
    ],
    2: [(2, None, "server", "accuracy", 0.75), (2, None, "server", "loss", 0.5)],
}


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files under ``log_dir``: tag -> (step, value)."""
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
    }


def mlflow_run(uri: str, experiment: str) -> Any:
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r} in {uri}"
    (run,) = client.search_runs([found.experiment_id])
    return run


def history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    metrics = MlflowClient(tracking_uri=uri).get_metric_history(run_id, key)
    return sorted((m.step, m.value) for m in metrics)


def test_tensorboard_sink_writes_the_aggregated_rows(tmp_path: Path) -> None:
    sink = trackers.TensorBoardSink(tmp_path / "tb", load_experiment(None))
    for rnd, rows in ROWS.items():
        sink.log_round(rnd, rows)
    sink.close("completed")
    got = scalars(tmp_path / "tb")
    assert set(got) == {
        "server/accuracy",
        "server/loss",
        "train/loss",
        "train/bytes-up",
    }
    assert got["server/accuracy"] == [(0, 0.125), (1, 0.625), (2, 0.75)]
    assert got["train/loss"] == [(1, 1.25)]


def test_mlflow_sink_logs_params_metrics_and_status(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # MLflow's plain-folder store (the end-to-end run below uses the SQLite one)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    exp = load_experiment(None, ["rounds=2", "name=unit"])
    sink = trackers.MlflowSink(uri, "unit-exp", "unit-run", exp, tmp_path / "run")
    for rnd, rows in ROWS.items():
        sink.log_round(rnd, rows)
    sink.close("failed")
    run = mlflow_run(uri, "unit-exp")
    assert run.info.run_name == "unit-run" and run.info.status == "FAILED"
    assert run.data.params["rounds"] == "2"
    assert run.data.params["data.dataset"] == "digits"
    assert run.data.tags["fedsim.run-dir"] == str(tmp_path / "run")
    assert history(uri, run.info.run_id, "server/accuracy") == [
        (0, 0.125),
        (1, 0.625),
        (2, 0.75),
    ]
    assert history(uri, run.info.run_id, "train/loss") == [(1, 1.25)]


class Flaky:
    """A sink that fails on the calls listed."""

    def __init__(self, fail_on: Sequence[int]):
        self.fail_on = set(fail_on)
        self.calls: list[int] = []
        self.closed: str | None = None

    def log_round(self, server_round: int, rows: Sequence[Row]) -> None:
        self.calls.append(server_round)
        if server_round in self.fail_on:
            raise OSError(f"broken at {server_round}")

    def close(self, status: str) -> None:
        self.closed = status


def test_a_tracker_that_cannot_start_fails_the_run() -> None:
    guarded = trackers.Guarded(Flaky([0]), "Flaky")
    with pytest.raises(OSError, match="broken at 0"):
        guarded.log_round(0, [])


def test_a_tracker_that_breaks_later_is_dropped_with_a_warning() -> None:
    sink = Flaky([2])
    guarded = trackers.Guarded(sink, "Flaky")
    guarded.log_round(0, [])
    guarded.log_round(1, [])
    with pytest.warns(RuntimeWarning, match="Flaky logging stopped: OSError"):
        guarded.log_round(2, [])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        guarded.log_round(3, [])
        guarded.close("completed")
    assert sink.calls == [0, 1, 2] and sink.closed is None


def unwrap(sink: RoundSink) -> RoundSink:
    assert isinstance(sink, trackers.Guarded)
    return sink.sink


def test_build_sinks_from_the_logging_table(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "x-1"
    assert trackers.build_sinks(load_experiment(None), run_dir) == []
    exp = load_experiment(
        None, ["name=e", "logging.tensorboard=true", "logging.mlflow=true"]
    )
    tb, ml = (unwrap(sink) for sink in trackers.build_sinks(exp, run_dir))
    assert isinstance(tb, trackers.TensorBoardSink)
    assert isinstance(ml, trackers.MlflowSink)
    assert tb.log_dir == run_dir / "tensorboard"
    assert ml.tracking_uri == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert ml.experiment_name == "e" and ml.run_name == "x-1"
    exp = load_experiment(
        None,
        [
            "logging.mlflow=true",
            "logging.mlflow-uri=file:/x",
            "logging.mlflow-experiment=m",
        ],
    )
    (only,) = trackers.build_sinks(exp, run_dir)
    ml = unwrap(only)
    assert isinstance(ml, trackers.MlflowSink)
    assert ml.tracking_uri == "file:/x" and ml.experiment_name == "m"


@pytest.mark.parametrize("key", ["tensorboard", "mlflow"])
def test_enabling_a_tracker_needs_its_extra(
    monkeypatch: pytest.MonkeyPatch, key: str
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == key else real(name),
    )
    with pytest.raises(
        ConfigError,
        match=rf"logging.{key}: True needs the optional extra: "
        rf"pip install 'fedsim\[{key}\]'",
    ):
        load_experiment(None, [f"logging.{key}=true"])
    load_experiment(None, [f"logging.{key}=false"])


@pytest.mark.slow
def test_a_run_with_both_trackers_and_a_live_report(tmp_path: Path) -> None:
    """One small CLI run: `fedsim report` while it goes, then the trackers' logs
    hold the per-round accuracy of metrics.parquet."""
    out = tmp_path / "runs"
    rounds = 6
    overrides = [
        *SMALL,
        f"rounds={rounds}",
        "name=tracked",
        "logging.tensorboard=true",
        "logging.mlflow=true",
    ]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedsim",
            "run",
            *sets(*overrides),
            "--out",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    live: list[tuple[str, int]] = []
    report: subprocess.CompletedProcess[str] | None = None
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        dirs = [p for p in out.glob("tracked-*") if p.is_dir()] if out.exists() else []
        if dirs:
            try:
                run = analysis.load_run(dirs[0])
            except analysis.RunDirError:  # between the directory and its files
                run = None
            if run is not None and run.status == "running" and not run.metrics.empty:
                live.append((run.status, run.rounds_done))
                if report is None:
                    report = subprocess.run(
                        [
                            sys.executable,
                            "-m",
                            "fedsim",
                            "report",
                            str(dirs[0]),
                            "--out",
                            str(tmp_path / "live"),
                            "--plot",
                            "accuracy_loss",
                        ],
                        capture_output=True,
                        text=True,
                    )
        time.sleep(0.05)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, output
    (run_dir,) = out.glob("tracked-*")

    # live view: rounds done so far, while the run was going
    # (the last round's metrics land just before the final summary does)
    assert live and all(0 <= done <= rounds for _, done in live)
    assert any(done < rounds for _, done in live)
    assert report is not None and report.returncode == 0, report
    row = next(line for line in report.stdout.splitlines() if "tracked" in line)
    assert f"/{rounds}" in row and ("running" in row or "completed" in row)
    assert (tmp_path / "live" / "accuracy_loss.png").stat().st_size > 10_000

    frame = pd.read_parquet(run_dir / "metrics.parquet")
    server = frame[(frame["phase"] == "server") & (frame["metric"] == "accuracy")]
    expected = list(zip(server["round"].astype(int), server["value"], strict=True))
    assert [r for r, _ in expected] == list(range(rounds + 1))
    evaluate = frame[
        (frame["phase"] == "evaluate")
        & (frame["metric"] == "accuracy")
        & frame["client"].isna()
    ]

    tb = scalars(run_dir / "tensorboard")
    assert [s for s, _ in tb["server/accuracy"]] == list(range(rounds + 1))
    assert [v for _, v in tb["server/accuracy"]] == pytest.approx(
        [v for _, v in expected],
        rel=1e-6,  # event files hold float32
    )
    assert [v for _, v in tb["evaluate/accuracy"]] == pytest.approx(
        evaluate["value"].tolist(), rel=1e-6
    )

    uri = f"sqlite:///{out / 'mlflow.db'}"
    run = mlflow_run(uri, "tracked")
    assert run.info.run_name == run_dir.name and run.info.status == "FINISHED"
    assert run.data.params["rounds"] == str(rounds)
    assert history(uri, run.info.run_id, "server/accuracy") == expected
