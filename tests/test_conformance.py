"""Every registered family under one contract (the test plug-ins included, found
in the registry, never in a hand-kept list): on its packaged experiment shrunk
to two rounds (:mod:`tests.conformance`)

- it runs to ``completed``;
- bytes down and up are recorded for every message the server sent and every
  reply, per (round, client, phase): the oracle is the grid's own log of the
  messages, their array payloads counted as Flower counts them
  (``len(array.data) + len(key)``);
- a bad value of each of its own options exits 2 with one line naming the key,
  before anything is written;
- interrupted after round 1 (round 2 ran, then the process died) and resumed, it
  ends with exactly the rows of the uninterrupted run, timing aside (same
  machine, same test: exact equality) — or ``--resume`` is refused with the
  family's declared reason (``Family.resume``).

Runs are in-process (:mod:`tests.inprocess`: the real ServerApp and ClientApp
code, no Ray); the spies write what they see to the working directory, here a
temporary one.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from flwr.app import Message

from fedsim.core import registry
from fedsim.core.errors import ConfigError
from fedsim.core.loading import load_experiment
from fedsim.core.messages import CONFIG, SERVER_ROUND
from fedsim.core.rundir import SUMMARY_FILE, read_metrics
from fedsim.engine.host import cli
from fedsim.engine.server import resume_checkpoint
from fedsim.engine.server.round_driver import SimulatedCrash
from fedsim.engine.server.run_recorder import create_run_dir
from tests import inprocess
from tests.conformance import bad_values, conformance_experiment, family_names, plugins

pytestmark = pytest.mark.usefixtures("task_identity")

FAMILIES = family_names()


@pytest.fixture
def family_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tmp_path_factory: Any
) -> Any:
    """The plug-ins importable, a temporary working directory, and one data and
    pre-training cache for the whole suite."""
    cache = tmp_path_factory.getbasetemp() / "conformance-cache"
    monkeypatch.setenv("FEDSIM_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    with plugins(monkeypatch):
        yield


class LoggingGrid(inprocess.ClientAppGrid):
    """The ClientApp grid, keeping every (message, reply) pair it carried."""

    log: list[tuple[Message, Message]] = []

    def answer(self, msg: Message, message_id: str) -> Message:
        reply = super().answer(msg, message_id)
        if msg.metadata.message_type != "query":
            LoggingGrid.log.append((msg, reply))
        return reply


def payload(msg: Message) -> int:
    """Bytes of a message's arrays as Flower counts them."""
    return sum(
        len(array.data) + len(key)
        for record in msg.content.array_records.values()
        for key, array in record.items()
    )


def logged_bytes(log: list[tuple[Message, Message]], partitions: dict[int, int]) -> Any:
    """(round, client, phase) -> [bytes down, bytes up] from the grid's log."""
    out: dict[tuple[int, int, str], list[int]] = defaultdict(lambda: [0, 0])
    for msg, reply in log:
        config = msg.content.config_records[CONFIG]
        key = (
            int(config[SERVER_ROUND]),  # type: ignore[arg-type]
            partitions[msg.metadata.dst_node_id],
            msg.metadata.message_type.split(".")[0],
        )
        out[key][0] += payload(msg)
        out[key][1] += payload(reply)
    return dict(out)


def recorded_bytes(run_dir: Path) -> Any:
    rows = read_metrics(run_dir)
    assert rows is not None
    rows = rows[
        rows["metric"].isin(["bytes-down", "bytes-up"]) & rows["client"].notna()
    ]
    table = rows.pivot_table(
        index=["round", "client", "phase"], columns="metric", values="value"
    )
    return {
        (int(r), int(c), str(p)): [int(v["bytes-down"]), int(v["bytes-up"])]
        for (r, c, p), v in table.iterrows()
    }


def status(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / SUMMARY_FILE).read_text())  # type: ignore[no-any-return]


@pytest.mark.parametrize("name", FAMILIES)
def test_family_runs_records_every_message_and_resumes_exactly(
    name: str, family_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, overrides = conformance_experiment(name)
    exp = load_experiment(path, overrides)
    family = registry.family(name)
    monkeypatch.setattr(inprocess, "ClientAppGrid", LoggingGrid)
    LoggingGrid.log = []

    whole = create_run_dir(tmp_path / "whole", exp)
    inprocess.simulate(exp, whole)
    assert status(whole)["status"] == "completed", status(whole)
    partitions = {100 + pid: pid for pid in range(exp.federation.clients)}
    sent = logged_bytes(LoggingGrid.log, partitions)
    assert sent  # the local baseline sends no arrays: zero bytes, still recorded
    assert recorded_bytes(whole) == sent

    cut = create_run_dir(tmp_path / "cut", exp)
    with pytest.raises(SimulatedCrash):
        inprocess.simulate(exp, cut, crash=2)  # round 2 ran, then the process died
    assert resume_checkpoint.check_resumable(cut)["round"] == 1
    if family.resume:
        with pytest.raises(ConfigError, match=f"--resume: strategy {name!r}"):
            inprocess.simulate(exp, cut, resume=True)
        return
    inprocess.simulate(exp, cut, resume=True)
    assert status(cut)["status"] == "completed"
    pd.testing.assert_frame_equal(
        inprocess.comparable(cut), inprocess.comparable(whole), check_exact=True
    )


@pytest.mark.parametrize("name", FAMILIES)
def test_a_bad_value_of_each_option_exits_2_before_anything_is_written(
    name: str,
    family_env: None,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, overrides = conformance_experiment(name)
    exp = load_experiment(path, overrides)
    for key, value in bad_values(exp).items():
        given = f"{key}={json.dumps(value)}"
        with pytest.raises(ConfigError, match=f"^{key}: "):
            load_experiment(path, [*overrides, given])  # never starts a run below
        out = tmp_path / "runs"
        argv = ["run", *([path] if path else [])]
        argv += [a for o in [*overrides, given] for a in ("--set", o)]
        assert cli.main([*argv, "--out", str(out)]) == 2, given
        err = capsys.readouterr().err
        assert err.startswith(f"fedsim: error: {key}: ") and err.count("\n") == 1
        assert not out.exists()
