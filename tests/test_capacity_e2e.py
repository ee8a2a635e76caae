"""HeteroFL, Pa3dFL and FedProphet end to end: one ``fedsim sweep`` (one Flower
run) over the three families on two clients of different capacity, with PGD
robust evaluation; ``fedsim report`` shows robust accuracy. The sweep is the
session's two-client sweep (``tests/conftest.py``: ``two_client_runs``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedsim.core.rundir import SUMMARY_FILE, read_metrics
from tests.runs import TWO_CLIENTS, SharedRun, fedsim

pytestmark = pytest.mark.slow

FAMILIES = ("heterofl", "pa3dfl", "fedprophet")


def test_the_three_families_run_in_one_sweep(
    tmp_path: Path, two_client_runs: dict[str, SharedRun]
) -> None:
    runs = {}
    for name in FAMILIES:
        assert f"strategy.name={name}" in TWO_CLIENTS[name]
        run_dir = two_client_runs[name].run_dir
        summary = json.loads((run_dir / SUMMARY_FILE).read_text())
        assert summary["status"] == "completed", summary
        runs[name] = read_metrics(run_dir)
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
        *(str(two_client_runs[name].run_dir) for name in FAMILIES),
        "--out",
        str(tmp_path / "png"),
        out=tmp_path,
    )
    assert report.returncode == 0, report.stderr
    assert "robust" in report.stdout
