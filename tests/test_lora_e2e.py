"""FLoRA and FedIT end to end: heterogeneous ranks, half the clients per round,
through the CLI and Flower's simulation runtime."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from flwr.app import ArrayRecord

from fedsim.core.loading import load_experiment
from fedsim.learn.base import build_model
from fedsim.learn.data import federated_data
from fedsim.learn.lora import lora_layout, rank_for
from fedsim.strategies.flora import AGGREGATION_ERROR
from tests.runs import SharedRun

pytestmark = pytest.mark.slow

HETERO = (
    "rounds=2",
    "federation.clients=4",
    "federation.fraction-train=0.5",
    "model.name=vit",
    "model.hidden=16",
    "model.depth=1",
    "model.heads=2",
    "peft.method=lora",
    "peft.ranks=[4, 2, 1]",
    "train.optimizer=adam",
    "train.lr=0.01",
)


def expected_bytes(overrides: tuple[str, ...]) -> tuple[int, int, dict[int, int]]:
    """Bytes of the whole model, of what travels down (``fedit``: in round 2,
    the head and the largest rank's global factors), and of each client's reply
    arrays, computed from the model itself."""
    exp = load_experiment(None, overrides)
    data = federated_data(exp.data, exp.federation.clients, exp.seed)
    model = build_model(exp.model, data.info, exp.seed)
    state = model.state_dict()
    layout = lora_layout(model, exp.peft)
    full = ArrayRecord(state).count_bytes()
    down = ArrayRecord({k: state[k] for k in layout.changing}).count_bytes()
    if exp.strategy.name == "fedit":
        down = factor_bytes(exp, state, layout, max(exp.peft.ranks))
    up = {
        pid: factor_bytes(exp, state, layout, rank_for(exp.peft, pid))
        for pid in range(exp.federation.clients)
    }
    return full, down, up


def factor_bytes(exp, state, layout, r: int) -> int:
    """Bytes of rank-``r`` factors of every adapted layer and the head."""
    arrays = {k: state[k] for k in layout.trained}
    for m in layout.adapted:
        d_out, d_in = state[f"{m}.weight"].shape
        arrays[f"{m}.lora_A.weight"] = torch.zeros(r, d_in)
        arrays[f"{m}.lora_B.weight"] = torch.zeros(d_out, r)
    return ArrayRecord(arrays).count_bytes()


FLORA = (
    *HETERO,
    "strategy.name=flora",
    "model.pretrain=digits",
    "model.pretrain-classes=[0, 1, 2, 3, 4]",
    "model.pretrain-epochs=2",
)
FEDIT = (*HETERO, "strategy.name=fedit")


def model_of(exp):
    data = federated_data(exp.data, exp.federation.clients, exp.seed)
    return build_model(exp.model, data.info, exp.seed)


def check_run(run_dir: Path, overrides: tuple[str, ...]) -> pd.Series:
    """Shared checks; returns the per-round aggregation error."""
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed", summary["reason"]
    assert summary["rounds_completed"] == 2 and summary["failures"] == 0
    frame = pd.read_parquet(run_dir / "metrics.parquet")
    train = frame[(frame["phase"] == "train") & frame["client"].notna()]
    rows = train.pivot_table(
        index=["round", "client"], columns="metric", values="value"
    )
    assert rows.groupby(level="round").size().tolist() == [2, 2]  # 0.5 of 4 clients
    exp = load_experiment(None, overrides)
    full, down, up = expected_bytes(overrides)
    head = ArrayRecord(
        {k: v for k, v in model_of(exp).state_dict().items() if k.startswith("head.")}
    ).count_bytes()
    assert down < full
    for (rnd, client), row in rows.iterrows():
        assert row["lora-rank"] == rank_for(exp.peft, int(client))
        # fedit: nothing to continue in round 1, only the head goes down
        first = exp.strategy.name == "fedit" and rnd == 1
        assert row["bytes-down"] == (head if first else down)
        assert row["bytes-up"] == up[int(client)]
    errors = frame[(frame["metric"] == AGGREGATION_ERROR) & frame["client"].isna()]
    assert errors["round"].tolist() == [1, 2]
    server = frame[(frame["phase"] == "server") & (frame["metric"] == "accuracy")]
    assert server["round"].tolist() == [0, 1, 2]
    return errors.set_index("round")["value"]


def test_flora_end_to_end_from_a_pretrained_base(
    four_client_runs: dict[str, SharedRun],
) -> None:
    """In the session's four-client sweep (``tests/conftest.py``), with a
    ``FEDSIM_CACHE`` of its own: the pretrained base is built there once."""
    run = four_client_runs["flora"]
    errors = check_run(run.run_dir, FLORA)
    assert (errors < 1e-9).all()
    assert run.cache is not None
    assert len(list((run.cache / "pretrain").glob("vit-*.pt"))) == 1  # built once


def test_fedit_end_to_end_reports_its_aggregation_noise(
    four_client_runs: dict[str, SharedRun],
) -> None:
    errors = check_run(four_client_runs["fedit"].run_dir, FEDIT)
    assert (errors > 1e-3).all()
