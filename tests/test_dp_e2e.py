"""Differential privacy end to end through the CLI and Flower's simulation."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from opacus.accountants import RDPAccountant

from fedsim.core.loading import load_experiment
from fedsim.core.seeding import derive_seed
from fedsim.learn.data import federated_data
from fedsim.privacy import accounting
from tests.runs import SMALL, SharedRun

pytestmark = pytest.mark.slow

LORA = (
    "model.name=vit",
    "model.hidden=16",
    "model.heads=2",
    "model.depth=1",
    "strategy.name=flora",
    "peft.method=lora",
    "peft.rank=4",
    "data.partitioner=iid",
)


def rdp_epsilon(sigma: float, sample_rate: float, steps: int, delta: float) -> float:
    oracle = RDPAccountant()
    oracle.history = [(sigma, sample_rate, steps)]
    return float(oracle.get_epsilon(delta))


def train_rows(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    return frame[(frame["phase"] == "train") & (frame["metric"] == metric)]


DP_SGD = (
    *SMALL,
    *LORA,
    "privacy.mechanism=dp-sgd",
    "privacy.noise-multiplier=1.0",
)


def dp_sgd_epsilons() -> tuple[dict[int, dict[int, float]], float]:
    """The oracle of the DP-SGD run: each client's epsilon after rounds 1-3
    (Opacus' RDP accountant over its planned steps), and a target that fits
    two rounds but not three."""
    exp = load_experiment(None, DP_SGD)
    data = federated_data(exp.data, exp.federation.clients, exp.seed)
    schedule = {
        pid: accounting.planned_steps(
            len(data.client(pid).train), exp.train.batch_size, exp.train.epochs, 3
        )[:2]
        for pid in range(exp.federation.clients)
    }
    delta = exp.privacy.target_delta
    after = {
        r: {pid: rdp_epsilon(1.0, q, r * n, delta) for pid, (q, n) in schedule.items()}
        for r in (1, 2, 3)
    }
    assert max(after[2].values()) < min(after[3].values())
    return after, (max(after[2].values()) + min(after[3].values())) / 2


DP_FEDAVG_TARGET = 5.0
DP_FEDAVG = (
    *SMALL,
    "privacy.mechanism=dp-fedavg",
    f"privacy.target-epsilon={DP_FEDAVG_TARGET}",
    "privacy.clipping-norm=0.5",
    "federation.fraction-train=0.5",
)
POISSON = (
    *SMALL,
    "privacy.mechanism=dp-fedavg",
    "privacy.noise-multiplier=1.0",
    "privacy.clipping-norm=0.5",
    "privacy.client-sampling='poisson'",
    "federation.fraction-train=0.5",
    "federation.failure-rate=0.25",
)


def dp_experiments() -> dict[str, tuple[str, ...]]:
    """This module's three experiments; they run in the session's four-client
    sweep (``tests/conftest.py``: ``four_client_runs``)."""
    _, target = dp_sgd_epsilons()
    return {
        "dp-fedavg": DP_FEDAVG,
        "poisson": POISSON,
        "dp-sgd": (*DP_SGD, f"privacy.target-epsilon={target}"),
    }


def test_dp_sgd_with_lora_accounts_per_round_and_stops_on_budget(
    four_client_runs: dict[str, SharedRun],
) -> None:
    """DP-SGD around FLoRA's LoRA clients: every client reports its cumulative
    epsilon (Opacus' RDP accountant over its whole history); with a budget that
    fits two rounds but not three, every client declines round 3 and the run
    stops cleanly."""
    exp = load_experiment(None, DP_SGD)
    after, target = dp_sgd_epsilons()
    run_dir = four_client_runs["dp-sgd"].run_dir
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "stopped"
    assert "privacy budget spent" in summary["reason"]
    assert summary["rounds_completed"] == 2

    frame = pd.read_parquet(run_dir / "metrics.parquet")
    per_client = train_rows(frame, "epsilon").dropna(subset=["client"])
    assert len(per_client) == 2 * exp.federation.clients
    for row in per_client.itertuples():
        assert row.value == pytest.approx(after[row.round][row.client], abs=1e-6)
        assert row.value <= target
    for rnd in (1, 2):
        values = [after[rnd][pid] for pid in range(exp.federation.clients)]
        rows = frame[(frame["round"] == rnd) & frame["client"].isna()]
        got = rows.set_index("metric")["value"]
        assert got["epsilon-max"] == pytest.approx(max(values), abs=1e-6)
        assert got["epsilon-mean"] == pytest.approx(sum(values) / len(values), abs=1e-6)
        assert got["clients-declined"] == 0


def test_dp_fedavg_records_epsilon_per_round(
    four_client_runs: dict[str, SharedRun],
) -> None:
    """Client-level DP with half the clients sampled per round and the noise
    calibrated for a budget: the server's epsilon per round is the RDP epsilon
    of r sampled Gaussian releases, and the last one lands just under target."""
    target = DP_FEDAVG_TARGET
    run_dir = four_client_runs["dp-fedavg"].run_dir
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["accounting"] == "poisson-approximation"

    frame = pd.read_parquet(run_dir / "metrics.parquet")
    server = frame[frame["client"].isna() & (frame["phase"] == "train")]
    by_round = server.pivot(index="round", columns="metric", values="value")
    sigma = float(by_round["noise-multiplier"].iloc[0])
    assert sigma == pytest.approx(accounting.calibrate_noise(target, 1e-5, 0.5, 3))
    assert list(by_round.index) == [1, 2, 3]
    for rnd, eps in by_round["epsilon"].items():
        assert eps == pytest.approx(rdp_epsilon(sigma, 0.5, int(rnd), 1e-5), abs=1e-6)
    assert 0.95 * target <= by_round["epsilon"].iloc[-1] <= target
    assert (by_round["clipping-norm"] == 0.5).all()
    assert (by_round["clients"] == 2).all()
    # clients train without sample-level DP: they report no epsilon of their own
    assert train_rows(frame, "epsilon")["client"].isna().all()


def test_dp_fedavg_poisson_sampling_with_failures(
    four_client_runs: dict[str, SharedRun],
) -> None:
    """Poisson client sampling through Flower's simulation, with clients
    dropping out: each round trains the partitions the seeded draw picks (one
    uniform per partition), rounds with failed clients are released all the
    same, and every round is accounted at q = fraction-train exactly."""
    exp = load_experiment(None, POISSON)
    chosen = {
        r: set(
            np.flatnonzero(
                np.random.default_rng(derive_seed(0, "poisson", r)).random(4) < 0.5
            )
        )
        for r in (1, 2, 3)
    }
    failed = {
        r: {
            p
            for p in chosen[r]
            if np.random.default_rng(derive_seed(0, "failure", r, int(p))).random()
            < 0.25
        }
        for r in (1, 2, 3)
    }
    # the seed gives rounds of 2, 4 and 3 clients, with failures in rounds 2, 3
    assert [len(chosen[r]) for r in (1, 2, 3)] == [2, 4, 3]
    assert [len(failed[r]) for r in (1, 2, 3)] == [0, 1, 1]

    run_dir = four_client_runs["poisson"].run_dir
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["accounting"] == "poisson"
    assert summary["failures"] == 2

    frame = pd.read_parquet(run_dir / "metrics.parquet")
    train = frame[frame["phase"] == "train"]
    for rnd in (1, 2, 3):
        rows = train[train["round"] == rnd]
        clients = set(rows["client"].dropna().astype(int))
        assert clients == chosen[rnd]
        dropped = set(rows[rows["metric"] == "failed"]["client"].astype(int))
        assert dropped == failed[rnd]
        server = rows[rows["client"].isna()].set_index("metric")["value"]
        assert server["clients"] == len(chosen[rnd]) - len(failed[rnd])
        delta = exp.privacy.target_delta
        assert server["epsilon"] == pytest.approx(
            rdp_epsilon(1.0, 0.5, rnd, delta), abs=1e-6
        )
