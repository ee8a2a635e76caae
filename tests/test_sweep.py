"""``fedsim sweep``: the grid validated before anything runs, one Flower run for
the whole sweep, each experiment's metrics equal to the same experiment run
alone, and a re-run that finishes only what is missing."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from fedsim.core.errors import ConfigError
from fedsim.core.loading import load_experiment
from fedsim.core.rundir import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE
from fedsim.core.sweeps import sweep_points
from fedsim.engine.host.sweep import SWEEP_INDEX, plan
from tests.conftest import CliRun, fedsim

#: The settings of the shared small run (``tests.conftest.SMALL``) on a 2x2 grid
#: whose last experiment is that run's experiment (seed 0, alpha 0.5: defaults).
SWEEP = """
name = "mini"
rounds = 3
[federation]
clients = 4
fraction-evaluate = 0.5
[model]
name = "mlp"
[train]
batch-size = 32
epochs = 2
[grid]
seed = [1, 0]
"data.alpha" = [1.0, 0.5]
"""
TIMING = ("seconds", "elapsed")


def untimed(run_dir: Path) -> pd.DataFrame:
    frame = pd.read_parquet(run_dir / METRICS_FILE)
    frame = frame[~frame["metric"].isin(TIMING)]
    keys = ["round", "client", "phase", "metric"]
    return frame.sort_values(keys).reset_index(drop=True)


def test_grid_and_variants_make_the_cross_product() -> None:
    points = sweep_points(
        {
            "rounds": 2,
            "grid": {"seed": [0, 1], "data": {"alpha": [0.1, 1.0]}},
            "variants": [{}, {"train": {"lr": 0.1}}],
        },
        ["federation.clients=4"],
    )
    assert len(points) == 8
    assert [p.experiment.seed for p in points[:4]] == [0, 0, 0, 0]
    assert points[1].settings == {"seed": 0, "data.alpha": 0.1, "train.lr": 0.1}
    assert points[1].experiment.train.lr == 0.1
    assert {p.experiment.federation.clients for p in points} == {4}
    assert points[1].label == "seed=0, data.alpha=0.1, train.lr=0.1"
    assert len({p.dirname for p in points}) == 8


def test_the_first_bad_experiment_is_named_and_nothing_is_written(
    tmp_path: Path,
) -> None:
    file = tmp_path / "bad.toml"
    file.write_text(SWEEP + '\n[[variants]]\n\n[[variants]]\n"data.alhpa" = 1.0\n')
    with pytest.raises(ConfigError) as err:
        plan(file, out=tmp_path / "runs")
    assert str(err.value) == (
        "sweep experiment 1 (seed=1, data.alpha=1.0, data.alhpa=1.0): "
        "data.alhpa: unknown key; "
        "did you mean 'data.alpha'?"
    )
    file.write_text(SWEEP.replace("[1.0, 0.5]", "[1.0, -0.5]"))
    with pytest.raises(ConfigError, match=r"^sweep experiment 1 \(seed=1, data"):
        plan(file, out=tmp_path / "runs")
    result = fedsim("sweep", str(file), out=tmp_path / "runs")
    assert result.returncode == 2 and result.stderr.startswith("fedsim: error: sweep")
    assert not (tmp_path / "runs").exists()


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 2x2 sweep, run once through the CLI."""
    root = tmp_path_factory.mktemp("sweep")
    file = root / "mini.toml"
    file.write_text(SWEEP)
    result = fedsim("sweep", str(file), "--out", str(root / "runs"), out=root)
    assert result.returncode == 0, result.stdout + result.stderr
    return root


@pytest.mark.slow
def test_sweep_runs_equal_the_same_experiments_run_alone(
    swept: Path, small_run: CliRun
) -> None:
    sweep_dir = swept / "runs" / "mini"
    index = json.loads((sweep_dir / SWEEP_INDEX).read_text())
    assert [e["status"] for e in index["experiments"]] == ["completed"] * 4
    # the last experiment (it follows three others on the same nodes and
    # actors) is the shared small run's experiment, run alone by `fedsim run`
    last = index["experiments"][-1]
    assert last["settings"] == {"seed": 0, "data.alpha": 0.5}
    run_dir = sweep_dir / last["run_dir"]
    alone = load_experiment(small_run.run_dir / CONFIG_FILE)
    assert replace(load_experiment(run_dir / CONFIG_FILE), name=alone.name) == alone
    pd.testing.assert_frame_equal(untimed(run_dir), untimed(small_run.run_dir))


@pytest.mark.slow
def test_a_re_run_finishes_only_the_missing_experiments(swept: Path) -> None:
    sweep_dir = swept / "runs" / "mini"
    runs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name[0] == "0")
    broken = runs[2] / SUMMARY_FILE
    summary = json.loads(broken.read_text())
    summary["status"] = "interrupted"
    broken.write_text(json.dumps(summary))
    before = {p.name: (p / SUMMARY_FILE).read_text() for p in runs if p != runs[2]}
    file = swept / "mini.toml"
    result = fedsim("sweep", str(file), "--out", str(swept / "runs"), out=swept)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "(4 experiments, 3 done)" in result.stdout
    assert "[3/4]" in result.stdout and "[1/4]" not in result.stdout
    after = {p.name: (p / SUMMARY_FILE).read_text() for p in runs if p != runs[2]}
    assert after == before  # the completed experiments were not touched
    assert json.loads(broken.read_text())["status"] == "completed"
