"""FedAvg and the recording layer against numpy oracles, without Ray."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    RecordDict,
)

from fedsim.core.errors import RoundFailed
from fedsim.core.loading import load_experiment
from fedsim.core.messages import ARRAYS, CONFIG, METRICS, NUM_EXAMPLES, PARTITION_ID
from fedsim.core.rundir import aggregate_replies, read_metrics
from fedsim.engine.server.exchange_recording import RecordingGrid
from fedsim.engine.server.round_driver import RoundRules
from fedsim.engine.server.run_recorder import RunRecorder
from fedsim.engine.server.strategy_recording import RecordingStrategy
from tests.conftest import ScriptedGrid, reply, strategy_for

pytestmark = pytest.mark.usefixtures("task_identity")


def test_fedavg_aggregate_train_matches_numpy_weighted_mean() -> None:
    rng = np.random.default_rng(0)
    examples = [10, 30, 60]
    models = [
        {
            "w": rng.normal(size=(4, 3)).astype(np.float32),
            "b": rng.normal(size=3).astype(np.float32),
        }
        for _ in examples
    ]
    replies = [
        reply(m, {"loss": float(i), NUM_EXAMPLES: n}, src=i + 1)
        for i, (m, n) in enumerate(zip(models, examples))
    ]
    strategy = strategy_for(load_experiment(None, ["federation.clients=3"]))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    p = np.array(examples, dtype=np.float64) / sum(examples)
    for key in ("w", "b"):
        oracle = sum(pk * m[key].astype(np.float64) for pk, m in zip(p, models))
        np.testing.assert_allclose(arrays[key].numpy(), oracle, rtol=1e-6, atol=1e-7)


def test_aggregate_replies_sums_counts_and_weights_means() -> None:
    replies = [
        (
            0,
            {
                "loss": 1.0,
                "examples": 10.0,
                "bytes-up": 5.0,
                "bytes-down": 7.0,
                "seconds": 2.0,
            },
        ),
        (1, {"loss": 3.0, "examples": 30.0, "bytes-up": 5.0, "bytes-down": 7.0}),
        (2, {"failed": 1.0, "bytes-down": 7.0}),
    ]
    out = aggregate_replies(replies)
    assert out["loss"] == pytest.approx((1 * 10 + 3 * 30) / 40)
    assert out["examples"] == 40 and out["bytes-up"] == 10 and out["bytes-down"] == 21
    assert out["clients"] == 2 and out["failures"] == 1
    assert "seconds" not in out


class FakeGrid(ScriptedGrid):
    """Answers train messages from a table of canned replies (no Flower runtime)."""

    def __init__(self, partitions: dict[int, int], fail: set[int] = frozenset()):
        super().__init__(partitions)
        self.fail = fail

    def answer(self, msg: Message, message_id: str) -> Message:
        node = msg.metadata.dst_node_id
        pid = self.partitions[node]
        if msg.metadata.message_type == MessageType.QUERY:
            return super().answer(msg, message_id)
        if pid in self.fail:
            return reply(None, {}, src=node, error=f"boom {pid}", reply_to=message_id)
        arrays = {"w": np.full((5, 5), float(pid), dtype=np.float32)}
        metrics = {"loss": 1.0 + pid, NUM_EXAMPLES: 10 * (pid + 1)}
        return reply(arrays, metrics, src=node, reply_to=message_id)


def train_messages(nodes: Iterable[int], arrays: ArrayRecord) -> list[Message]:
    content = RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord({"server-round": 1})})
    return [
        Message(content, dst_node_id=n, message_type=MessageType.TRAIN) for n in nodes
    ]


def test_recording_grid_orders_nodes_by_partition_and_records_bytes(
    tmp_path: Path,
) -> None:
    exp = load_experiment(None, ["federation.clients=3"])
    recorder = RunRecorder(tmp_path, exp)
    fake = FakeGrid({907: 2, 13: 0, 555: 1}, fail={1})
    grid = RoundRules(RecordingGrid(fake, recorder, num_clients=3), min_replies=1)
    assert grid.get_node_ids() == [13, 555, 907]
    down = ArrayRecord([np.zeros((10, 10), dtype=np.float32)])
    replies = grid.send_and_receive(train_messages(grid.get_node_ids(), down))
    # returned in partition order, whatever the arrival order
    assert [r.metadata.src_node_id for r in replies] == [13, 555, 907]
    recorder.end_round(1)
    frame = read_metrics(tmp_path)
    assert frame is not None
    train = frame[frame["phase"] == "train"]
    per_client = train.dropna(subset=["client"]).pivot(
        index="client", columns="metric", values="value"
    )
    assert per_client.loc[1, "failed"] == 1 and pd.isna(per_client.loc[0, "failed"])
    # bytes are at least the raw float32 payload and carry only small headers
    assert 400 <= per_client.loc[0, "bytes-down"] < 400 + 256
    assert 100 <= per_client.loc[0, "bytes-up"] < 100 + 256
    assert per_client.loc[2, "examples"] == 30
    agg = train[train["client"].isna()].set_index("metric")["value"]
    assert agg["failures"] == 1 and agg["clients"] == 2
    assert agg["examples"] == 40
    assert agg["loss"] == pytest.approx((1.0 * 10 + 3.0 * 30) / 40)
    assert agg["bytes-down"] == 3 * per_client.loc[0, "bytes-down"]
    assert recorder.failures[0]["reason"] == "boom 1"


def test_simulated_nodes_get_partitions_assigned_without_a_query(
    tmp_path: Path,
) -> None:
    exp = load_experiment(None, ["federation.clients=3"])
    recorder = RunRecorder(tmp_path, exp)
    fake = FakeGrid({907: 0, 13: 2, 555: 1})  # node config the server never asks
    grid = RecordingGrid(fake, recorder, num_clients=3, assign=True)
    assert grid.partitions() == {13: 0, 555: 1, 907: 2}  # sorted node ids
    assert fake.sent == []  # no discovery message
    shared = ArrayRecord([np.zeros(4, dtype=np.float32)])
    messages = train_messages([907, 13, 555], shared)  # one content for all nodes
    grid.send_and_receive(messages)
    stamped = {
        m.metadata.dst_node_id: m.content[CONFIG][PARTITION_ID] for m in fake.sent
    }
    assert stamped == {13: 0, 555: 1, 907: 2}
    assert all(m.content[CONFIG]["server-round"] == 1 for m in fake.sent)
    assert all(m.content[ARRAYS] is shared for m in fake.sent)  # not copied


class SilentGrid(FakeGrid):
    """A FakeGrid whose nodes in ``silent`` never answer a train message."""

    def __init__(self, partitions: dict[int, int], fail: set[int], silent: set[int]):
        super().__init__(partitions, fail)
        self.silent = silent

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [
            m
            for m in super().pull_messages(message_ids)
            if self.partitions[m.metadata.src_node_id] not in self.silent
            or PARTITION_ID in m.content[METRICS]  # the partition query
        ]


def test_too_few_replies_fail_the_round(tmp_path: Path) -> None:
    exp = load_experiment(None, ["federation.clients=3"])
    recorder = RunRecorder(tmp_path, exp)
    grid = RoundRules(
        RecordingGrid(FakeGrid({1: 0, 2: 1, 3: 2}, fail={0, 1}), recorder, num_clients=3),
        min_replies=2,
    )
    down = ArrayRecord([np.zeros(3, dtype=np.float32)])
    with pytest.raises(RoundFailed, match="1 of 3 clients replied.*min-replies = 2"):
        grid.send_and_receive(train_messages(grid.get_node_ids(), down))


def test_the_round_that_ends_the_run_records_every_failure(tmp_path: Path) -> None:
    """Client 0 fails, client 1 never answers (timeout), client 2 replies: too
    few replies. Every failure has its row, the reason names the timeout."""
    exp = load_experiment(None, ["federation.clients=3"])
    recorder = RunRecorder(tmp_path, exp)
    fake = SilentGrid({1: 0, 2: 1, 3: 2}, fail={0}, silent={1})
    grid = RoundRules(RecordingGrid(fake, recorder, num_clients=3), min_replies=2)
    down = ArrayRecord([np.zeros(3, dtype=np.float32)])
    with recorder.recording():
        recorder.server(0, {"accuracy": 0.1, "loss": 2.0})
        recorder.end_round(0)
        grid.send_and_receive(train_messages(grid.get_node_ids(), down), timeout=0.2)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["rounds_completed"] == 0
    assert "1 of 3 clients replied" in summary["reason"]
    assert (
        "1 did not reply within federation.round-timeout = 0.2 s" in summary["reason"]
    )
    frame = read_metrics(tmp_path)
    assert frame is not None
    failed = frame[(frame["metric"] == "failed") & frame["client"].notna()]
    assert sorted(failed["client"].astype(int)) == [0, 1]
    assert summary["failures"] == len(failed) == 2
    reasons = {d["client"]: d["reason"] for d in summary["failure_details"]}
    assert reasons == {
        0: "boom 0",
        1: "no reply within federation.round-timeout = 0.2 s",
    }
    agg = frame[(frame["round"] == 1) & frame["client"].isna()]
    assert agg.set_index("metric")["value"]["failures"] == 2
    # no server rows for the round that did not complete
    assert set(frame[frame["phase"] == "server"]["round"]) == {0}


def test_recording_strategy_records_only_the_strategys_own_metrics(
    tmp_path: Path,
) -> None:
    exp = load_experiment(None, ["federation.clients=2"])
    recorder = RunRecorder(tmp_path, exp)
    inner = strategy_for(exp)

    class WithError(type(inner)):  # type: ignore[misc]
        def aggregate_train(self, server_round, replies):  # type: ignore[no-untyped-def]
            arrays, metrics = super().aggregate_train(server_round, replies)
            metrics["aggregation-error"] = 0.25
            return arrays, metrics

    strategy = RecordingStrategy(WithError(min_available_nodes=2), recorder, seed=0)
    replies = [
        reply({"w": np.ones(2, np.float32)}, {"loss": 1.0, NUM_EXAMPLES: 5}, src=i)
        for i in (1, 2)
    ]
    strategy.aggregate_train(1, replies)
    recorder.end_round(1)
    frame = read_metrics(tmp_path)
    assert frame is not None
    rows = frame[frame["client"].isna() & (frame["phase"] == "train")]
    assert rows.set_index("metric")["value"]["aggregation-error"] == 0.25
    assert "num-examples" not in set(rows["metric"])


def test_metrics_file_survives_a_crash_after_a_round(tmp_path: Path) -> None:
    exp = load_experiment(None, ["rounds=5"])
    recorder = RunRecorder(tmp_path, exp)
    with pytest.raises(ZeroDivisionError):
        with recorder.recording():
            recorder.server(1, {"accuracy": 0.5, "loss": 1.0})
            recorder.end_round(1)
            recorder.server(2, {"accuracy": 0.6})
            raise ZeroDivisionError("a crash in round 2")
    frame = read_metrics(tmp_path)
    assert frame is not None and set(frame["round"]) == {1}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and "ZeroDivisionError" in summary["reason"]
    assert summary["rounds_completed"] == 1 and summary["final"]["accuracy"] == 0.5


def test_sampling_depends_on_the_seed_alone(tmp_path: Path) -> None:
    """Other draws from `random` (Flower's threads do that) do not change which
    clients a round samples; the seed and the round do."""
    import random

    def sampled(seed: int, server_round: int, noise: int) -> list[int]:
        exp = load_experiment(
            None, ["federation.clients=10", "federation.fraction-train=0.3"]
        )
        recorder = RunRecorder(tmp_path / f"{seed}-{server_round}-{noise}", exp)
        partitions = {100 + 7 * i: i for i in range(10)}
        grid = RecordingGrid(FakeGrid(partitions), recorder, num_clients=10)
        strategy = RecordingStrategy(strategy_for(exp), recorder, seed=seed)
        for _ in range(noise):
            random.random()
        arrays = ArrayRecord([np.zeros(2, np.float32)])
        messages = strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
        return sorted(partitions[m.metadata.dst_node_id] for m in messages)

    first = sampled(1, 3, noise=0)
    assert len(first) == 3
    assert sampled(1, 3, noise=17) == first
    assert sampled(1, 4, noise=0) != first or sampled(2, 3, noise=0) != first


def test_metrics_read_while_the_recorder_rewrites_them(tmp_path: Path) -> None:
    """A live reader (progress display, `fedsim report`) never sees a torn file."""
    import threading
    import time

    from fedsim.core.rundir import atomic_write, metrics_frame

    rows = [(i, None, "server", "accuracy", 0.5) for i in range(2000)]
    stop = threading.Event()

    def rewrite() -> None:
        k = 0
        while not stop.is_set():
            frame = metrics_frame(rows[: 1000 + k % 1000])
            atomic_write(
                tmp_path / "metrics.parquet",
                lambda p, f=frame: f.to_parquet(p, index=False),
            )
            k += 1

    writer = threading.Thread(target=rewrite)
    writer.start()
    try:
        deadline, reads = time.monotonic() + 3, 0
        while time.monotonic() < deadline:
            frame = read_metrics(tmp_path)
            assert frame is None or len(frame) >= 1000
            reads += 1
    finally:
        stop.set()
        writer.join()
    assert reads > 50


def test_slowest_clients_of_the_last_round_are_pushed_first(tmp_path: Path) -> None:
    """Longest processing time first: the simulation runtime starts clients in
    push order, so the grid pushes last round's slowest clients of the phase
    first (clients it has not seen yet before them); replies come back in
    partition order all the same."""
    took = {0: 0.2, 1: 0.9, 2: 0.5, 3: 0.7}

    class TimedGrid(FakeGrid):
        def answer(self, msg: Message, message_id: str) -> Message:
            out = super().answer(msg, message_id)
            out.content[METRICS]["seconds"] = took[
                self.partitions[msg.metadata.dst_node_id]
            ]
            return out

    exp = load_experiment(None, ["federation.clients=4"])
    recorder = RunRecorder(tmp_path, exp)
    fake = TimedGrid({40: 3, 10: 0, 30: 2, 20: 1})
    grid = RoundRules(
        RecordingGrid(fake, recorder, num_clients=4, assign=True), min_replies=1
    )
    down = ArrayRecord([np.zeros(3, dtype=np.float32)])
    order = [10, 20, 30, 40]
    first = grid.send_and_receive(train_messages(order[:3], down))
    assert [m.metadata.dst_node_id for m in fake.sent] == [10, 20, 30]
    fake.sent.clear()
    took[0] = 1.5  # partition 0 got slower
    again = grid.send_and_receive(train_messages(order, down))
    # 40 unseen, then 20 (0.9 s), 30 (0.5 s), 10 (0.2 s)
    assert [m.metadata.dst_node_id for m in fake.sent] == [40, 20, 30, 10]
    fake.sent.clear()
    grid.send_and_receive(train_messages(order, down))
    assert [m.metadata.dst_node_id for m in fake.sent] == [10, 20, 40, 30]
    for replies in (first, again):
        pids = [grid.partitions()[r.metadata.src_node_id] for r in replies]
        assert pids == sorted(pids)


def test_finetuned_evaluation_trains_e_epochs_then_evaluates() -> None:
    """``strategy.finetune-epochs = E``: the evaluate reply is the received
    model trained E epochs on the client's train split (the one local loop,
    seeded by round and partition), then evaluated on its test split; E = 0
    is the global model as received."""
    import copy

    import torch

    from fedsim.clients.full import FineTunedEvaluationClient
    from fedsim.core.seeding import derive_seed
    from fedsim.learn.base import build_model
    from fedsim.learn.data import federated_data
    from fedsim.learn.training import evaluate, local_fit
    from fedsim.privacy.base import NoPrivacy

    tiny = ("data.dataset=synthetic", "data.size=200", "model.name=mlp")
    exp = load_experiment(None, [*tiny, "strategy.finetune-epochs=2"])
    data = federated_data(exp.data, exp.federation.clients, exp.seed)
    client = FineTunedEvaluationClient(exp, data.info, torch.device("cpu"))
    model = build_model(exp.model, data.info, exp.seed)
    arrays = ArrayRecord({k: v.clone() for k, v in model.state_dict().items()})
    content = RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord({"server-round": 3})})
    part = data.client(1)
    got = client.evaluate(content, part, server_round=3, state=RecordDict())[METRICS]

    oracle = copy.deepcopy(model)
    two = load_experiment(None, [*tiny, "train.epochs=2"])
    local_fit(
        oracle,
        part.train,
        two,
        seed=derive_seed(exp.seed, "finetune", 3, 1),
        device=torch.device("cpu"),
        state=RecordDict(),
        mechanism=NoPrivacy(two),
    )
    want = evaluate(oracle, part.test, device=torch.device("cpu"))
    assert got["accuracy"] == want.accuracy and got["loss"] == want.loss
    plain = evaluate(model, part.test, device=torch.device("cpu"))
    assert got["loss"] != plain.loss  # it did train
    zero = load_experiment(None, list(tiny))
    as_is = FineTunedEvaluationClient(zero, data.info, torch.device("cpu"))
    same = as_is.evaluate(content, part, server_round=3, state=RecordDict())[METRICS]
    assert same["loss"] == plain.loss and same["accuracy"] == plain.accuracy


def test_finetuned_evaluation_refuses_a_privacy_mechanism() -> None:
    from fedsim.core.errors import ConfigError
    from fedsim.core.family import load

    exp = load_experiment(
        None,
        [
            "strategy.finetune-epochs=1",
            "privacy.mechanism=dp-sgd",
            "privacy.noise-multiplier=1.0",
        ],
    )
    with pytest.raises(ConfigError, match="strategy.finetune-epochs"):
        load("fedsim.strategies.fedavg:check")(exp, None, None)
