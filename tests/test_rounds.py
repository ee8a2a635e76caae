"""The round driver closes a round while the next one runs: the order of events
against a scripted grid, the resume checkpoint's state taken when the round
ended, and the rounds closed when the run ends or stops."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedsim.core.errors import RunStopped
from fedsim.core.loading import load_experiment
from fedsim.core.messages import NUM_EXAMPLES
from fedsim.core.rundir import read_metrics
from fedsim.engine.server.exchange_recording import RecordingGrid
from fedsim.engine.server.round_driver import RoundDriver
from fedsim.engine.server.run_recorder import RunRecorder
from fedsim.engine.server.strategy_recording import RecordingStrategy
from tests.conftest import ScriptedGrid, reply


class LoggingGrid(ScriptedGrid):
    """Each client returns the global ``w`` + 1; pushes and pulls are logged."""

    def __init__(self, log: list[tuple[str, float]]):
        super().__init__({11: 0, 12: 1})
        self.log = log

    def push_messages(self, messages: Any) -> Any:
        messages = list(messages)
        if "arrays" in messages[0].content:  # not the partition-id query
            w = messages[0].content["arrays"]["w"].numpy()
            self.log.append(("push", float(w[0])))
        return super().push_messages(messages)

    def pull_messages(self, message_ids: Any) -> Any:
        self.log.append(("pull", 0.0))
        return super().pull_messages(message_ids)

    def respond(self, msg: Message, message_id: str, node: int, pid: int) -> Message:
        w = msg.content["arrays"]["w"].numpy() + 1
        return reply({"w": w}, {NUM_EXAMPLES: 1.0}, src=node, reply_to=message_id)


class Counting(FedAvg):
    """FedAvg that counts its ``configure_train`` calls (its checkpoint state);
    stops the run in round ``stop``."""

    def __init__(self, stop: int | None = None):
        super().__init__(fraction_evaluate=0.0)
        self.configured = 0
        self.stop = stop

    def configure_train(self, server_round: int, *args: Any) -> Any:
        if server_round == self.stop:
            raise RunStopped(f"stop in round {server_round}")
        self.configured += 1
        return super().configure_train(server_round, *args)

    def checkpoint_state(self) -> dict[str, Any]:
        return {"configured": self.configured}


def drive(
    tmp_path: Path, rounds: int, stop: int | None = None
) -> tuple[list[tuple[str, float]], RunRecorder]:
    log: list[tuple[str, float]] = []
    exp = load_experiment(None, ["federation.clients=2"])
    recorder = RunRecorder(tmp_path, exp)
    family = Counting(stop)
    grid = RecordingGrid(
        LoggingGrid(log), recorder, num_clients=2, assign=True
    )

    def evaluate(arrays: ArrayRecord) -> dict[str, float]:
        log.append(("evaluate", float(arrays["w"].numpy()[0])))
        return {"accuracy": 0.5}

    def checkpoint(server_round: int, arrays: ArrayRecord | None) -> Any:
        log.append(("taken", float(family.configured)))

        def write() -> None:
            assert read_metrics(tmp_path)["round"].max() == server_round
            log.append(("written", float(server_round)))

        return write

    driver = RoundDriver(
        RecordingStrategy(family, recorder, seed=0),
        grid,
        recorder,
        evaluate=evaluate,
        rounds=rounds,
        timeout=5.0,
        resume_save=checkpoint,
    )
    initial = ArrayRecord({"w": Array(np.zeros(1, dtype=np.float32))})
    with recorder.recording():
        driver.run(initial)
    return log, recorder


def test_a_round_closes_once_the_next_rounds_messages_are_out(
    task_identity: None, tmp_path: Path
) -> None:
    log, recorder = drive(tmp_path, rounds=3)
    events = [(name, value) for name, value in log if name != "pull"]
    assert events == [
        ("push", 0.0),  # round 1 goes out first,
        ("evaluate", 0.0),  # then the initial model is evaluated
        ("taken", 1.0),  # round 1 ended: its state before round 2 configures
        ("push", 1.0),
        ("evaluate", 1.0),
        ("written", 1.0),
        ("taken", 2.0),
        ("push", 2.0),
        ("evaluate", 2.0),
        ("written", 2.0),
        ("taken", 3.0),  # the last round closes before the run ends
        ("evaluate", 3.0),
        ("written", 3.0),
    ]
    # the closing job ran before the replies were pulled
    assert log[log.index(("push", 1.0)) + 2][0] == "written"
    assert log[log.index(("push", 1.0)) + 3][0] == "pull"
    assert recorder.rounds_completed == 3


def test_a_round_the_next_one_stops_before_sending_is_closed(
    task_identity: None, tmp_path: Path
) -> None:
    log, recorder = drive(tmp_path, rounds=4, stop=3)
    assert recorder.summary["status"] == "stopped"
    assert log[-2:] == [("evaluate", 2.0), ("written", 2.0)]
    frame = read_metrics(tmp_path)
    server = frame[frame["phase"] == "server"]
    assert sorted(set(server["round"])) == [0, 1, 2]
    assert set(frame.loc[frame["client"].notna(), "round"]) == {1, 2}


def test_a_deferred_job_runs_once_after_the_push(
    task_identity: None, tmp_path: Path
) -> None:
    exp = load_experiment(None, ["federation.clients=2"])
    log: list[tuple[str, float]] = []
    grid = RecordingGrid(
        LoggingGrid(log), RunRecorder(tmp_path, exp), num_clients=2
    )
    grid.defer(lambda: log.append(("job", 0.0)))
    with pytest.raises(RuntimeError, match="deferred job already"):
        grid.defer(lambda: None)
    content = RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros(1))})})
    message = Message(content=content, dst_node_id=11, message_type="train")
    list(grid.push_messages([message]))
    grid.run_deferred()
    assert [name for name, _ in log] == ["push", "job"]
