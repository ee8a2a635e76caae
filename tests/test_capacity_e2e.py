"""HeteroFL, Pa3dFL and FedProphet end to end: one ``fedsim sweep`` (one Flower
run) over the three families on two clients of different capacity, with PGD
robust evaluation; ``fedsim report`` shows robust accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedsim.core.rundir import SUMMARY_FILE, read_metrics
from fedsim.engine.sweep import SWEEP_INDEX
from tests.conftest import fedsim

pytestmark = pytest.mark.slow

SWEEP = """
name = "capacity"
rounds = 2

[federation]
clients = 2

[model]
name = "mlp"
hidden = 8

[robust]
epsilon = 0.1
steps = 2

[[variants]]
"strategy.name" = "heterofl"
"strategy.capacities" = [1.0, 0.5]

[[variants]]
"strategy.name" = "pa3dfl"
"strategy.capacities" = [1.0, 0.5]
"strategy.rank" = 4

[[variants]]
"strategy.name" = "fedprophet"
"strategy.memory-mb" = [0.05, 0.02]
"strategy.local-iterations" = 2
"strategy.steps" = 2
"""


def test_the_three_families_run_in_one_sweep(tmp_path: Path) -> None:
    file = tmp_path / "capacity.toml"
    file.write_text(SWEEP)
    result = fedsim(
        "sweep", str(file), "--out", str(tmp_path / "runs"), out=tmp_path, timeout=900
    )
    assert result.returncode == 0, result.stdout + result.stderr
    sweep_dir = tmp_path / "runs" / "capacity"
    entries = json.loads((sweep_dir / SWEEP_INDEX).read_text())["experiments"]
    runs = {}
    for entry in entries:
        run_dir = sweep_dir / entry["run_dir"]
        summary = json.loads((run_dir / SUMMARY_FILE).read_text())
        assert summary["status"] == "completed", summary
        frame = read_metrics(run_dir)
        runs[entry["run_dir"]] = frame
    assert len(runs) == 3
    for name, frame in runs.items():
        clients = frame[frame["client"].notna()]
        evaluated = clients[(clients["phase"] == "evaluate") & (clients["round"] == 2)]
        robust = evaluated[evaluated["metric"] == "robust-accuracy"]
        assert len(robust) == 2 and robust["value"].between(0, 1).all(), name
        train = clients[(clients["phase"] == "train") & (clients["round"] == 2)]
        down = train[train["metric"] == "bytes-down"].set_index("client")["value"]
        if "fedprophet" in name:
            stage = train[train["metric"] == "stage"]["value"]
            assert (stage == 1).all(), name  # one round per module, then stage 2
        else:  # the half-width client gets less
            assert down[1] < down[0], name
    report = fedsim(
        "report",
        *(str(sweep_dir / e["run_dir"]) for e in entries),
        "--out",
        str(tmp_path / "png"),
        out=tmp_path,
    )
    assert report.returncode == 0, report.stderr
    assert "robust" in report.stdout
