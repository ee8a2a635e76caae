"""Faults a new user still hit: each refused or survived with one line.

- a run or sweep directory is locked while a process owns it: resuming a live
  run, two resumes at once and two identical sweeps at once exit 2 naming the
  owner; a lock left by a killed process is stale and taken over;
- a damaged data-cache entry is detected, rebuilt, and the user told in one line;
  an unwritable cache means no caching;
- a truncated resume checkpoint and ``fedsim report --out FILE`` are one line,
  exit 2.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from fedsim.core.errors import ConfigError
from fedsim.core.loading import load_experiment
from fedsim.core.locking import LOCK_FILE, locked, owner_of
from fedsim.core.rundir import CHECKPOINTS_DIR, RESUME_CHECKPOINT, SUMMARY_FILE
from fedsim.engine.host import cli
from fedsim.engine.server import resume_checkpoint
from fedsim.engine.server.run_recorder import create_run_dir
from fedsim.learn import data

SMALL = ["data.dataset=synthetic", "data.size=200", "federation.clients=2"]


@contextmanager
def holder(directory: Path, purpose: str) -> Iterator[subprocess.Popen[str]]:
    """Another process that holds ``directory``'s lock until it is killed."""
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from fedsim.core.locking import locked\n"
        f"with locked(Path({str(directory)!r}), {purpose!r}):\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(300)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def failed_run(tmp_path: Path) -> Path:
    """A run directory that failed after checkpointing round 1."""
    exp = load_experiment(None, SMALL)
    run_dir = create_run_dir(tmp_path, exp)
    digest = resume_checkpoint.config_digest(run_dir)
    resume_checkpoint.write_checkpoint(run_dir, {"round": 1, "config": digest})
    (run_dir / SUMMARY_FILE).write_text(json.dumps({"status": "failed"}))
    return run_dir


def listing(directory: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in directory.rglob("*")}


def test_a_live_run_is_not_resumed_twice_and_a_stale_lock_is_taken_over(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = failed_run(tmp_path)
    for purpose in ("fedsim run", "fedsim run --resume"):  # live run, a resume
        with holder(run_dir, purpose) as proc:
            before = listing(run_dir)
            argv = ["run", "--resume", str(run_dir), "--out", str(tmp_path / "o")]
            assert cli.main(argv) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1, err
            who = f"{purpose} (process {proc.pid} on {socket.gethostname()})"
            assert f"is in use by {who}" in err
            assert listing(run_dir) == before  # nothing written
        # killed: its lock file stays, stale (the next holder takes it over)
        assert owner_of(run_dir)["pid"] == proc.pid  # type: ignore[index]
    # a lock file whose process died without removing it (SIGKILL) is stale
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    stale = {"pid": proc.pid, "host": socket.gethostname(), "purpose": "fedsim run"}
    (run_dir / LOCK_FILE).write_text(json.dumps(stale))
    with locked(run_dir, "fedsim run --resume"):
        assert owner_of(run_dir) == {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "purpose": "fedsim run --resume",
        }
    assert not (run_dir / LOCK_FILE).exists()


def test_a_killed_owner_leaves_a_stale_lock_the_next_owner_takes(
    tmp_path: Path,
) -> None:
    with holder(tmp_path, "fedsim run") as proc:
        with pytest.raises(ConfigError, match=f"process {proc.pid}"):
            with locked(tmp_path, "fedsim run --resume"):
                pass
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert owner_of(tmp_path)["pid"] == proc.pid  # type: ignore[index]
        with locked(tmp_path, "fedsim run --resume"):
            assert owner_of(tmp_path)["pid"] == os.getpid()  # type: ignore[index]


def test_a_sweep_whose_directory_or_run_is_in_use_exits_2_writing_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(
        'name = "s"\nrounds = 1\n[model]\nname = "mlp"\n[data]\ndataset = "synthetic"\n'
        '[[variants]]\n"train.lr" = 0.05\n[[variants]]\n"train.lr" = 0.1\n'
    )
    out = tmp_path / "runs"
    (out / "sweep").mkdir(parents=True)
    with holder(out / "sweep", "fedsim sweep") as proc:
        before = listing(out)
        assert cli.main(["sweep", str(sweep), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"fedsim sweep (process {proc.pid}" in err
        assert listing(out) == before
    # one of its runs, unfinished, is being resumed on its own: not cleared
    from fedsim.core.loading import to_toml
    from fedsim.engine.host.sweep import plan

    work = plan(sweep, [], out)
    run_dir = work.run_dir(work.todo[0])
    run_dir.mkdir(parents=True)
    (run_dir / "config.toml").write_text(to_toml(work.todo[0].experiment))
    with holder(run_dir, "fedsim run --resume") as proc:
        before = listing(out)
        assert cli.main(["sweep", str(sweep), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"{run_dir} is in use by fedsim run --resume (process {proc.pid}" in err
        assert listing(out) == before


# -- the data cache -----------------------------------------------------------------
def _damage(path: Path, how: str) -> None:
    raw = bytearray(path.read_bytes())
    if how == "truncated":
        raw = raw[: len(raw) // 2]
    elif how == "emptied":
        raw = bytearray()
    else:  # one byte flipped in the middle of the arrays
        raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("how", ["truncated", "emptied", "flipped"])
def test_a_damaged_cache_entry_is_rebuilt_and_the_user_told_in_one_line(
    how: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("FEDSIM_CACHE", str(tmp_path))
    exp = load_experiment(None, SMALL)
    data.federated_data.cache_clear()
    built = data.federated_data(exp.data, 2, exp.seed)
    # copies: the built arrays map the files about to be damaged
    pool_x, parts = np.array(built.pool.x), [np.array(p) for p in built.partitions]
    (entry,) = (tmp_path / "data").iterdir()
    _damage(entry / "pool_x.npy", how)
    data.federated_data.cache_clear()
    again = data.federated_data(exp.data, 2, exp.seed)
    data.federated_data.cache_clear()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"data cache entry {entry} is damaged" in err
    assert "rebuilding it" in err
    np.testing.assert_array_equal(again.pool.x, pool_x)
    for a, b in zip(again.partitions, parts, strict=True):
        np.testing.assert_array_equal(a, b)
    # rewritten whole, and read back clean
    np.testing.assert_array_equal(np.load(entry / "pool_x.npy"), pool_x)
    data.federated_data.cache_clear()
    data.federated_data(exp.data, 2, exp.seed)
    data.federated_data.cache_clear()
    assert capsys.readouterr().err == ""


def test_an_unwritable_cache_means_no_caching(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("FEDSIM_CACHE", str(blocker / "cache"))  # mkdir fails
    exp = load_experiment(None, SMALL)
    data.federated_data.cache_clear()
    got = data.federated_data(exp.data, 2, exp.seed)
    data.federated_data.cache_clear()
    assert len(got.partitions) == 2 and sum(len(p) for p in got.partitions) > 0


# -- one line, exit 2 ---------------------------------------------------------------
def test_a_truncated_resume_checkpoint_is_one_line(tmp_path: Path) -> None:
    run_dir = failed_run(tmp_path)
    path = run_dir / CHECKPOINTS_DIR / RESUME_CHECKPOINT
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ConfigError, match=r"--resume: .*resume.npz is damaged"):
        resume_checkpoint.check_resumable(run_dir)


def test_report_out_naming_a_file_and_an_out_of_range_seed_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    afile = tmp_path / "plots.png"
    afile.write_text("")
    assert cli.main(["report", str(tmp_path), "--out", str(afile)]) == 2
    err = capsys.readouterr().err
    assert err == f"fedsim: error: --out: {afile} is a file, not a directory\n"
    for seed in (-1, 2**32):
        out = tmp_path / "runs"
        assert cli.main(["run", "--set", f"seed={seed}", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err == f"fedsim: error: seed: {seed} must be in [0, 4294967295]\n"
        assert not out.exists()
    assert load_experiment(None, [f"seed={2**32 - 1}"]).seed == 2**32 - 1


# -- settings that do nothing ---------------------------------------------------------
IGNORED = [
    (["privacy.noise-multiplier=1.0"], "privacy.noise-multiplier: 1.0 is ignored"),
    (["privacy.target-epsilon=3"], "privacy.target-epsilon: 3.0 is ignored"),
    (
        [
            "privacy.mechanism=dp-sgd",
            "privacy.noise-multiplier=1.0",
            "privacy.clipping='adaptive'",
        ],
        "privacy.clipping: 'adaptive' is ignored with privacy.mechanism = 'dp-sgd'",
    ),
    (
        [
            "privacy.mechanism=dp-fedavg",
            "privacy.noise-multiplier=1.0",
            "privacy.max-grad-norm=2.0",
        ],
        "privacy.max-grad-norm: 2.0 is ignored with privacy.mechanism = 'dp-fedavg'",
    ),
    (
        [
            "privacy.mechanism=dp-fedavg",
            "privacy.noise-multiplier=1.0",
            "privacy.clip-norm-lr=0.5",
        ],
        "privacy.clip-norm-lr: 0.5 is ignored with privacy.clipping = 'fixed'",
    ),
    (["peft.ranks=[4, 2]"], r"peft.ranks: \[4, 2\] is ignored with peft.method"),
    (["peft.rank=4"], "peft.rank: 4 is ignored with peft.method = 'none'"),
    (
        [
            "federation.clients=2",
            "strategy.name=flora",
            "peft.method=lora",
            "peft.ranks=[4, 2, 1]",
        ],
        "peft.ranks: 3 entries for federation.clients = 2",
    ),
]


@pytest.mark.parametrize(("overrides", "message"), IGNORED)
def test_a_setting_the_chosen_mechanism_or_method_ignores_is_refused(
    overrides: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=f"^{message}"):
        load_experiment(None, overrides)


def test_settings_equal_to_their_defaults_are_harmless() -> None:
    harmless = [
        "privacy.noise-multiplier=0.0",
        "privacy.target-delta=1e-5",
        "privacy.clipping='fixed'",
        "peft.ranks=[]",
        "peft.rank=8",
    ]
    exp = load_experiment(None, harmless)
    assert exp.privacy.mechanism == "none" and exp.peft.method == "none"


def test_capacities_longer_than_the_federation_are_refused_before_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "runs"
    for key in ("strategy.capacities=[1.0, 0.5, 0.25]",):
        argv = ["run", "--set", "strategy.name=heterofl", "--set", key]
        argv += ["--set", "federation.clients=2", "--set", "model.name=mlp"]
        assert cli.main([*argv, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(
            "fedsim: error: strategy.capacities: 3 entries for federation.clients = 2"
        )
        assert err.count("\n") == 1 and not out.exists()


# -- empty partitions, non-finite losses ---------------------------------------------
def test_clients_without_training_data_are_named_before_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDSIM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "runs"
    skewed = [
        "data.dataset=synthetic",
        "data.size=200",
        "data.partitioner=dirichlet",
        "data.alpha=0.01",
        "data.min-partition-size=0",
        "federation.clients=20",
        "model.name=mlp",
    ]
    exp = load_experiment(None, skewed)
    built = data.federated_data(exp.data, 20, exp.seed)
    empty = [p for p in range(20) if len(built.client(p).train) == 0]
    assert empty  # the oracle: the partitions themselves
    argv = ["run", *[a for o in skewed for a in ("--set", o)], "--out", str(out)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and not out.exists()
    named = ", ".join(map(str, empty))
    assert f"data.partitioner: {len(empty)} of 20 clients get no training" in err
    assert f"(clients {named})" in err


@pytest.mark.usefixtures("task_identity")
def test_a_non_finite_loss_fails_the_run_unless_allowed(tmp_path: Path) -> None:
    from tests.inprocess import comparable, simulate

    diverging = [
        "data.dataset=synthetic",
        "data.size=200",
        "federation.clients=2",
        "model.name=mlp",
        "model.hidden=8",
        "rounds=2",
        "train.lr=1e12",
    ]
    exp = load_experiment(None, diverging)
    run_dir = create_run_dir(tmp_path / "strict", exp)
    simulate(exp, run_dir)
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    assert summary["status"] == "failed"  # the CLI exits 1
    assert summary["reason"].startswith("round 1: client ")
    assert "train loss is nan (training diverged)" in summary["reason"]
    assert "train.allow-nonfinite = true" in summary["reason"]

    exp = load_experiment(None, [*diverging, "train.allow-nonfinite=true"])
    run_dir = create_run_dir(tmp_path / "allowed", exp)
    simulate(exp, run_dir)
    assert json.loads((run_dir / SUMMARY_FILE).read_text())["status"] == "completed"
    rows = comparable(run_dir)
    losses = rows[(rows["metric"] == "loss") & (rows["phase"] == "train")]
    assert losses["value"].isna().any()  # recorded as they are
