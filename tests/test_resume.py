"""``fedsim run --resume``: a run interrupted after round k and resumed ends with
exactly the metrics of the same run uninterrupted, with every privacy mechanism
(every family: tests/test_conformance.py).

The oracle is the uninterrupted run itself. Most families run in-process: the
real ServerApp ``run`` (build, privacy and recording wrappers, round driver,
checkpoints) on a grid that hands each message to the real ClientApp handler
with a per-node ``Context``, as Flower's simulation runtime does. The resumed
half starts like a new process: fresh contexts (empty ``context.state``), the
client and server caches cleared, the global random generators scrambled. One
slow test goes through the real CLI and Flower.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import RecordDict

from fedsim.core.errors import ConfigError
from fedsim.core.loading import load_experiment
from fedsim.core.rundir import (
    CHECKPOINTS_DIR,
    CLIENT_STATE_DIR,
    CONFIG_FILE,
    SUMMARY_FILE,
)
from fedsim.engine.client.client_state import ClientStateStore, from_bytes, to_bytes
from fedsim.engine.server import resume_checkpoint, server_app
from fedsim.engine.server.round_driver import SimulatedCrash
from fedsim.engine.server.run_recorder import create_run_dir
from tests.conftest import fedsim, sets
from tests.inprocess import comparable, new_process, simulate

pytestmark = pytest.mark.usefixtures("task_identity")

DIGITS = (
    "federation.clients=3",
    "data.dataset=synthetic",
    "data.size=240",
    "model.name=mlp",
    "model.hidden=8",
    "train.epochs=1",
    "rounds=3",
)
#: The privacy mechanisms' state (accountants, clipping norms, noise generators,
#: declined clients) across a resume. Every family's own resume is checked by the
#: conformance suite over the registry (tests/test_conformance.py).
MECHANISMS = {
    "fedavg": (*DIGITS, "federation.fraction-train=0.67"),
    "fedavg-dp-sgd": (
        *DIGITS,
        "privacy.mechanism=dp-sgd",
        "privacy.noise-multiplier=1.0",
        "privacy.target-epsilon=0",
    ),
    "fedavg-dp-fedavg-adaptive": (
        *DIGITS,
        "privacy.mechanism=dp-fedavg",
        "privacy.noise-multiplier=0.5",
        "privacy.clipping='adaptive'",
        "privacy.clipped-count-stddev=1.0",
        "privacy.clipping-norm=0.1",
    ),
    "fedavg-dp-fedavg-poisson": (
        *DIGITS,
        "privacy.mechanism=dp-fedavg",
        "privacy.noise-multiplier=1.0",
        "privacy.client-sampling='poisson'",
        "federation.fraction-train=0.5",
    ),
    "fedprox-dp-sgd": (
        *DIGITS,
        "strategy.name=fedprox",
        "strategy.proximal-mu=0.1",
        "privacy.mechanism=dp-sgd",
        "privacy.noise-multiplier=1.0",
    ),
}


@pytest.mark.parametrize("family", sorted(MECHANISMS))
def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(
    family: str, tmp_path: Path
) -> None:
    exp = load_experiment(None, list(MECHANISMS[family]))
    whole = create_run_dir(tmp_path / "whole", exp)
    simulate(exp, whole)
    assert json.loads((whole / SUMMARY_FILE).read_text())["status"] == "completed"

    cut = create_run_dir(tmp_path / "cut", exp)
    with pytest.raises(SimulatedCrash):
        simulate(exp, cut, crash=2)  # round 2 ran, then the process died
    summary = json.loads((cut / SUMMARY_FILE).read_text())
    assert summary["status"] == "failed" and summary["rounds_completed"] == 1
    saved = resume_checkpoint.check_resumable(cut)
    assert saved["round"] == 1
    simulate(exp, cut, resume=True)

    expected, got = comparable(whole), comparable(cut)
    assert len(expected) > 0
    pd.testing.assert_frame_equal(got, expected, check_exact=True)
    summary = json.loads((cut / SUMMARY_FILE).read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == 3
    assert [r["after_round"] for r in summary["resumed"]] == [1]
    with pytest.raises(ConfigError, match="ended with status 'completed'"):
        resume_checkpoint.check_resumable(cut)


# -- the pieces ------------------------------------------------------------------
def test_pack_round_trips_json_values_and_arrays_exactly() -> None:
    big = 2**100 + 7  # numpy Generator states hold 128-bit integers
    tree = {
        "round": 3,
        "x": [0.1, float("nan"), None, "s", big],
        "a": {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "e": np.zeros(0)},
    }
    back = resume_checkpoint.unpack(resume_checkpoint.pack(tree))
    assert back["round"] == 3 and back["x"][0] == 0.1 and back["x"][4] == big
    assert np.isnan(back["x"][1]) and back["x"][2:4] == [None, "s"]
    assert back["a"]["w"].dtype == np.float32
    np.testing.assert_array_equal(back["a"]["w"], tree["a"]["w"])
    assert list(back["a"]) == ["w", "e"]  # order kept (ArrayRecords depend on it)


def test_generators_continue_where_they_were_captured() -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.random(), np.random.rand(3), torch.rand(2)
    saved = resume_checkpoint.unpack(resume_checkpoint.pack(resume_checkpoint.rng_state()))
    expected = (random.random(), np.random.rand(3), torch.rand(2))
    new_process()
    resume_checkpoint.restore_rng(saved)
    got = (random.random(), np.random.rand(3), torch.rand(2))
    assert got[0] == expected[0]
    np.testing.assert_array_equal(got[1], expected[1])
    assert torch.equal(got[2], expected[2])


def test_client_store_keeps_three_rounds_and_a_resume_drops_later_ones(
    tmp_path: Path,
) -> None:
    from flwr.app import ConfigRecord

    store = ClientStateStore(tmp_path)
    for rnd in (1, 2, 4, 5):
        store.save(0, rnd, RecordDict({"acct": ConfigRecord({"steps": [rnd]})}))
    store.save(0, 5, RecordDict({"acct": ConfigRecord({"steps": [55]})}))  # same round
    folder = tmp_path / CHECKPOINTS_DIR / CLIENT_STATE_DIR / "0"
    kept = ["000002.pb", "000004.pb", "000005.pb"]
    assert sorted(p.name for p in folder.iterdir()) == kept
    rnd, state = store.load(0)  # type: ignore[misc]
    assert rnd == 5 and state["acct"]["steps"] == [55]
    # the run died in round 5 while closing round 4: the checkpoint is round 3
    store.prune_after(3)
    rnd, state = store.load(0)  # type: ignore[misc]
    assert rnd == 2 and state["acct"]["steps"] == [2]
    assert store.load(1) is None
    store.save(1, 1, RecordDict({"fedsim-sweep": ConfigRecord({"index": 0})}))
    assert store.load(1) is None  # engine bookkeeping only: nothing to keep
    restored = RecordDict()
    store.restore_into(0, restored)
    store.restore_into(0, restored)  # once per client only
    assert to_bytes(RecordDict({"acct": restored["acct"]})) == to_bytes(state)
    assert from_bytes(to_bytes(state))["acct"]["steps"] == [2]


def _failed_run(tmp_path: Path) -> Path:
    """A run directory that failed after checkpointing round 1 (no run needed:
    the refusals read only the directory)."""
    exp = load_experiment(None, list(MECHANISMS["fedavg"]))
    run_dir = create_run_dir(tmp_path, exp)
    digest = resume_checkpoint.config_digest(run_dir)
    resume_checkpoint.write_checkpoint(run_dir, {"round": 1, "config": digest})
    (run_dir / SUMMARY_FILE).write_text(json.dumps({"status": "failed"}))
    return run_dir


def test_resume_refuses_a_changed_config_a_finished_run_and_no_checkpoint(
    tmp_path: Path,
) -> None:
    assert resume_checkpoint.check_resumable(_failed_run(tmp_path / "ok"))["round"] == 1
    run_dir = _failed_run(tmp_path / "a")
    (run_dir / CONFIG_FILE).write_text(
        (run_dir / CONFIG_FILE).read_text().replace("rounds = 3", "rounds = 4")
    )
    with pytest.raises(ConfigError, match="config.toml changed"):
        resume_checkpoint.check_resumable(run_dir)
    early = _failed_run(tmp_path / "b")
    (early / CHECKPOINTS_DIR / "resume.npz").unlink()
    with pytest.raises(ConfigError, match="no checkpoint"):
        resume_checkpoint.check_resumable(early)
    with pytest.raises(ConfigError, match="not a run directory"):
        resume_checkpoint.check_resumable(tmp_path)


def test_cli_resume_refuses_a_changed_key_with_exit_2_and_one_line(
    tmp_path: Path,
) -> None:
    run_dir = _failed_run(tmp_path / "runs")
    changed = fedsim(
        "run", "--resume", str(run_dir), "--set", "train.lr=0.5", out=tmp_path / "o"
    )
    assert changed.returncode == 2, changed.stdout + changed.stderr
    assert changed.stderr.count("\n") == 1
    assert "--resume: train.lr = 0.5 differs" in changed.stderr
    assert not (tmp_path / "o").exists()  # nothing written
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    (run_dir / SUMMARY_FILE).write_text(json.dumps({**summary, "status": "completed"}))
    with pytest.raises(ConfigError, match="ended with status 'completed'"):
        resume_checkpoint.check_resumable(run_dir)


# -- one run through the CLI and Flower ---------------------------------------------
E2E = (
    "federation.clients=2",
    "data.dataset=synthetic",
    "data.size=200",
    "model.name=mlp",
    "model.hidden=8",
    "rounds=3",
    "privacy.mechanism=dp-sgd",
    "privacy.noise-multiplier=1.0",
    "privacy.target-epsilon=0",
)


@pytest.mark.slow
def test_cli_resume_after_a_crash_ends_as_the_uninterrupted_run(
    tmp_path: Path,
) -> None:
    """FedAvg + DP-SGD through Flower: round 2 crashes, ``--resume`` finishes the
    run; the metrics equal those of the uninterrupted run (in-process, the same
    ServerApp and ClientApp code), DP-SGD's per-client epsilon included."""
    env = {**os.environ, server_app.CRASH_IN_ROUND: "2"}
    crashed = fedsim("run", *sets(*E2E), out=tmp_path / "runs", env=env, timeout=900)
    assert crashed.returncode == 1, crashed.stdout + crashed.stderr
    run_dir = crashed.run_dir
    assert json.loads((run_dir / SUMMARY_FILE).read_text())["rounds_completed"] == 1
    resumed = fedsim(
        "run", "--resume", str(run_dir), out=tmp_path / "unused", timeout=900
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "round   2/3" in resumed.stdout and "round   1/3" not in resumed.stdout
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == 3

    exp = load_experiment(None, list(E2E))
    whole = create_run_dir(tmp_path / "whole", exp)
    simulate(exp, whole)
    expected, got = comparable(whole), comparable(run_dir)
    assert "epsilon" in set(got["metric"])
    pd.testing.assert_frame_equal(got, expected, check_exact=True)
