"""SCAFFOLD and FedAdam through the CLI and Flower's simulation, from
the session's two-client sweep (``tests/conftest.py``: ``two_client_runs``):
SCAFFOLD's control variates travel in both directions and its clients' state
is saved for ``--resume``."""

from __future__ import annotations

import json

import pytest

from fedsim.core.rundir import (
    CHECKPOINTS_DIR,
    CLIENT_STATE_DIR,
    SUMMARY_FILE,
    read_metrics,
)
from fedsim.engine.client.client_state import ClientStateStore
from tests.runs import SharedRun

pytestmark = pytest.mark.slow


def test_scaffold_and_fedadam_run_end_to_end(
    two_client_runs: dict[str, SharedRun],
) -> None:
    up = {}
    for name in ("scaffold", "fedadam"):
        run_dir = two_client_runs[name].run_dir
        summary = json.loads((run_dir / SUMMARY_FILE).read_text())
        assert summary["status"] == "completed", summary
        frame = read_metrics(run_dir)
        assert frame is not None
        rows = frame[
            frame["client"].notna()
            & (frame["phase"] == "train")
            & (frame["round"] == 2)
        ]
        up[name] = rows[rows["metric"] == "bytes-up"]["value"].to_numpy()
        down = rows[rows["metric"] == "bytes-down"]["value"].to_numpy()
        assert len(up[name]) == 2 and (down > 0).all(), name
    # SCAFFOLD uploads a model and a control variate update of the same size
    ratio = up["scaffold"].mean() / up["fedadam"].mean()
    assert 1.9 < ratio < 2.1, ratio
    run_dir = two_client_runs["scaffold"].run_dir
    assert (run_dir / CHECKPOINTS_DIR / CLIENT_STATE_DIR).is_dir()
    for partition in (0, 1):
        saved = ClientStateStore(run_dir).load(partition)
        assert saved is not None and "scaffold-control" in saved[1], partition
