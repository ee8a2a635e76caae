"""U-shaped split learning end to end through Flower's simulation runtime:
every message a client sends the server, inspected; the same run audited
(activation inversion of the first batch, a few iterations).

The ``split-ushape-spy`` plug-in (``tests/spy``) is U-shaped split learning
whose server writes every reply of every exchange to disk.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedsim.core.loading import load_experiment
from fedsim.core.rundir import SUMMARY_FILE, read_metrics
from fedsim.learn.data import federated_data
from tests.runs import TWO_CLIENTS, SharedRun

pytestmark = pytest.mark.slow


def test_ushape_messages_to_the_server_carry_no_labels_and_no_inputs(
    two_client_runs: dict[str, SharedRun],
) -> None:
    run = two_client_runs["split-ushape-spy"]  # 1 round, 2 clients (tests/conftest.py)
    seen = run.seen
    assert seen is not None
    summary = json.loads((run.run_dir / SUMMARY_FILE).read_text())
    assert summary["status"] == "completed"

    spy, *overrides = TWO_CLIENTS["split-ushape-spy"]
    assert spy == "strategy.name=split-ushape-spy"
    exp = load_experiment(None, ["strategy.name=split-ushape", *overrides])
    data = federated_data(exp.data, 2, exp.seed)
    weights = {"body.0", "body.1", "body.2"}  # the default cut: body.2
    replies = sorted(seen.glob("up-r1-*.npz"))
    for pid in (0, 1):
        train = data.client(pid).train
        batches = -(-len(train) // 32)
        mine = [dict(np.load(p)) for p in replies if f"-p{pid}-" in p.name]
        assert len(mine) == 1 + 2 * batches  # start, then two per batch
        for up in mine:
            for name, array in up.items():
                record, _, key = name.partition("|")
                if record == "cut":
                    assert key.startswith(("activations.", "gradient.")), key
                    assert array.shape[0] <= 32 and array.dtype == np.float32
                else:  # the last reply: the client's head and tail weights
                    assert record == "arrays"
                    assert key.rsplit(".", 1)[0] in {*weights, "head"}, key
                assert not (array.dtype.kind in "iu" and array.ndim == 1), name
                if array.ndim == 2 and array.shape[1] == train.x.shape[1]:
                    for row in array:
                        assert not np.isclose(train.x, row).all(axis=1).any()
    labels_in = [n for p in replies for n in np.load(p).files if "label" in n]
    assert labels_in == []

    rows = read_metrics(run.run_dir)
    assert rows is not None
    clients = rows[rows["client"].notna() & (rows["phase"] == "train")]
    assert (clients[clients["metric"] == "bytes-up"]["value"] > 0).all()
    assert set(rows[rows["phase"] == "server"]["metric"]) >= {"accuracy", "loss"}
    # the audit heard the train exchange (activations up) through Flower's runtime
    psnr = rows[(rows["metric"] == "attack-psnr") & rows["client"].notna()]
    assert sorted(psnr["client"]) == [0, 1] and np.isfinite(psnr["value"]).all()
    assert ((rows["phase"] == "audit") & (rows["metric"] == "seconds")).sum() == 1
