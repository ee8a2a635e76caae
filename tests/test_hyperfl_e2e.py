"""HyperFL end to end through Flower's simulation runtime: what leaves a client.

The ``hyperfl-spy`` plug-in (``tests/spy``) is HyperFL with a spy on both sides:
the server writes every reply of every exchange, the clients write their
private embedding, head and generated weights after each round.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from fedsim.core.rundir import SUMMARY_FILE, read_metrics
from fedsim.learn.hypernet import HyperNetwork, extractor_shapes
from fedsim.learn.models import MLP
from tests.runs import SharedRun

pytestmark = pytest.mark.slow


def test_uploads_hold_exactly_the_hypernetwork_and_nothing_private(
    two_client_runs: dict[str, SharedRun],
) -> None:
    run = two_client_runs["hyperfl-spy"]  # 2 rounds, 2 clients (tests/conftest.py)
    seen = run.seen
    assert seen is not None

    # What the hypernetwork of this model is, built independently here.
    target = MLP(64, 16, 10, 0.0)
    net = HyperNetwork(extractor_shapes(target), embedding_dim=64, hidden_dim=128)
    expected = {f"arrays|{k}": tuple(v.shape) for k, v in net.state_dict().items()}
    initial = dict(np.load(seen / "initial.npz"))
    assert {f"arrays|{k}": v.shape for k, v in initial.items()} == expected

    train = [dict(np.load(p)) for p in sorted(seen.glob("up-train-*.npz"))]
    evaluate = [dict(np.load(p)) for p in sorted(seen.glob("up-evaluate-*.npz"))]
    private = [dict(np.load(p)) for p in sorted(seen.glob("private-*.npz"))]
    assert len(train) == len(private) == 4 and len(evaluate) == 4  # 2 x 2
    assert all(up == {} for up in evaluate)  # evaluation replies carry no arrays
    for up in train:
        assert {k: v.shape for k, v in up.items()} == expected
    secrets = [v for p in private for v in p.values()]
    assert {k.split("|")[0] for p in private for k in p} == {"private", "generated"}
    assert any(k == "private|embedding" for k in private[0])
    for up in train:
        for array in up.values():
            for secret in secrets:
                assert array.shape != secret.shape or not np.allclose(array, secret)
                assert not np.isin(secret.ravel()[:8], array.ravel()).all()

    rows = read_metrics(run.run_dir)
    clients = rows[rows["client"].notna()]
    up_bytes = clients[
        (clients["metric"] == "bytes-up") & (clients["phase"] == "train")
    ]
    hyper_bytes = sum(v.nbytes for v in initial.values())
    assert up_bytes["value"].min() >= hyper_bytes
    assert up_bytes["value"].max() < hyper_bytes * 1.01
    assert not (rows["phase"] == "server").any() or set(
        rows.loc[rows["phase"] == "server", "metric"]
    ) <= {"elapsed"}
    summary = pd.read_json(run.run_dir / SUMMARY_FILE, typ="series")
    assert summary["headline"] == "evaluate" and summary["rounds_completed"] == 2
    assert torch.tensor(summary["final"]["accuracy"]).item() > 0.1
