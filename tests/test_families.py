"""Strategy families as plug-ins, rounds of any shape, the round driver.

The plug-in is ``tests/plugin``: a package with its ``.dist-info`` (entry point
``ping`` in the ``fedsim.strategies`` group), found by ``importlib.metadata``
once the folder is on the path, exactly as an installed package is.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flwr.app import Array, ArrayRecord, Message, MessageType, RecordDict

from fedsim.core import registry
from fedsim.core.errors import ConfigError
from fedsim.core.loading import from_run_config, load_experiment, to_run_config
from fedsim.core.messages import ARRAYS, NUM_EXAMPLES
from fedsim.core.rundir import METRICS_FILE, SUMMARY_FILE, read_metrics
from fedsim.engine.server.exchange_recording import RecordingGrid, array_bytes
from fedsim.engine.server.round_driver import RoundDriver
from fedsim.engine.server.run_recorder import RunRecorder
from fedsim.engine.server.strategy_recording import RecordingStrategy
from fedsim.learn.base import build_model
from fedsim.learn.data import federated_data
from fedsim.privacy.budget import PrivacyBudgetStrategy
from tests.conftest import ScriptedGrid, reply
from tests.runs import PLUGIN, TWO_CLIENTS, SharedRun, fedsim, sets


@pytest.fixture
def plugin(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The ping plug-in on the path, its families freshly discovered."""
    monkeypatch.syspath_prepend(str(PLUGIN))
    registry.families.cache_clear()
    yield
    registry.families.cache_clear()


def plugin_env() -> dict[str, str]:
    path = os.pathsep.join([str(PLUGIN), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path}


def test_built_in_families_are_declared_through_entry_points() -> None:
    assert {"fedavg", "flora", "fedit"} <= set(registry.families())
    assert registry.family("flora").peft == ("lora",)
    assert registry.family("fedavg").global_model


def test_an_installed_plug_in_family_is_found_with_its_options(plugin: None) -> None:
    assert "ping" in registry.families()
    exp = load_experiment(None, ["strategy.name=ping", "strategy.factor=3"])
    assert exp.strategy.options.factor == 3
    assert from_run_config(to_run_config(exp)) == exp
    with pytest.raises(ConfigError, match=r"strategy.factor: 0 must be >= 1"):
        load_experiment(None, ["strategy.name=ping", "strategy.factor=0"])
    with pytest.raises(ConfigError, match="strategy.factor: unknown key"):
        load_experiment(None, ["strategy.factor=3"])  # fedavg has no such option


def test_the_declaration_decides_peft_and_privacy() -> None:
    with pytest.raises(ConfigError, match="peft.method: 'lora' cannot run"):
        load_experiment(None, ["peft.method=lora"])
    with pytest.raises(ConfigError, match="strategy.name: 'flora' cannot run under"):
        load_experiment(
            None,
            [
                "strategy.name=flora",
                "peft.method=lora",
                "privacy.mechanism=dp-fedavg",
                "privacy.noise-multiplier=1.0",
            ],
        )


class PingGrid(ScriptedGrid):
    """Answers ``train.ping`` by doubling and ``train`` with canned replies."""

    @property
    def types(self) -> list[str]:
        return [m.metadata.message_type for m in self.sent]

    def answer(self, msg: Message, message_id: str) -> Message:
        node = msg.metadata.dst_node_id
        pid = self.partitions[node]
        kind = msg.metadata.message_type
        if kind == MessageType.QUERY:
            return super().answer(msg, message_id)
        if kind == "train.ping":
            n = msg.content[ARRAYS]["n"].numpy()
            return reply({"n": 2 * n}, {"pings": 1.0}, src=node, reply_to=message_id)
        if kind == MessageType.TRAIN:
            w = {"w": np.full(3, float(pid), dtype=np.float32)}
            metrics = {"loss": 1.0, NUM_EXAMPLES: 10}
            return reply(w, metrics, src=node, reply_to=message_id)
        return reply(
            None,
            {"loss": 1.0, "accuracy": 0.5, NUM_EXAMPLES: 4},
            src=node,
            reply_to=message_id,
        )


def test_wrappers_forward_a_family_round_and_rows_sum_its_exchanges(
    plugin: None, tmp_path: Path, task_identity: None
) -> None:
    """RecordingStrategy around PrivacyBudgetStrategy around the ping family:
    the family's own round runs (ping first), every wrapper's hooks apply, and a
    client's two train exchanges are one row per metric with summed bytes."""
    from fedsim_ping.server import PingFedAvg

    exp = load_experiment(None, ["strategy.name=ping", "federation.clients=3"])
    recorder = RunRecorder(tmp_path, exp)
    family = PingFedAvg(2, min_available_nodes=3, weighted_by_key=NUM_EXAMPLES)
    budget = PrivacyBudgetStrategy(family, num_clients=3, target_epsilon=1.0)
    strategy = RecordingStrategy(budget, recorder, seed=0)
    fake = PingGrid({11: 0, 12: 1, 13: 2})
    grid = RecordingGrid(fake, recorder, num_clients=3)
    initial = ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})
    driver = RoundDriver(
        strategy, grid, recorder, evaluate=None, rounds=2, timeout=10.0
    )
    final = driver.run(initial)
    assert final is not None and np.allclose(final["w"].numpy(), 1.0)  # mean of 0,1,2
    assert family.pinged == {1: 3, 2: 3}
    assert fake.types[:6] == ["query"] * 3 + ["train.ping"] * 3
    rows = read_metrics(tmp_path)
    clients = rows[rows["client"].notna()]
    assert not clients.duplicated(["round", "client", "phase", "metric"]).any()
    train = clients[clients["phase"] == "train"].pivot_table(
        index=["round", "client"], columns="metric", values="value"
    )
    assert set(train["pings"]) == {1.0}  # the ping exchange was merged in
    ping_up = array_bytes(
        RecordDict({ARRAYS: ArrayRecord({"n": Array(np.array([2.0]))})})
    )
    train_up = array_bytes(
        RecordDict({ARRAYS: ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})})
    )
    assert set(train["bytes-up"]) == {ping_up + train_up}
    epsilon_rows = rows[(rows["metric"] == "clients-declined") & rows["client"].isna()]
    assert list(epsilon_rows["round"]) == [1, 2]  # the budget wrapper's hook ran


def test_a_round_closes_without_a_global_model(tmp_path: Path) -> None:
    """A family without a global model: no server rows, every round still closed,
    the clients' local evaluation is the headline."""
    exp = load_experiment(None, ["federation.clients=2"])
    recorder = RunRecorder(tmp_path, exp, headline="evaluate")

    class Private:
        def run_round(self, server_round, arrays, grid, *, timeout, hooks):
            assert arrays is None
            for pid in (0, 1):
                recorder.client(
                    server_round,
                    "evaluate",
                    pid,
                    {"accuracy": 0.5 + 0.1 * server_round, "loss": 1.0, "examples": 5},
                )
            return None

    driver = RoundDriver(
        Private(),
        grid=RecordingGrid(ScriptedGrid({}), recorder, num_clients=2),
        recorder=recorder,
        evaluate=None,
        rounds=3,
        timeout=1.0,
    )
    with recorder.recording():
        driver.run(None)
    rows = read_metrics(tmp_path)
    assert not (rows["phase"] == "server").any() or set(
        rows.loc[rows["phase"] == "server", "metric"]
    ) == {"elapsed"}
    summary = pd.read_json(tmp_path / SUMMARY_FILE, typ="series")
    assert summary["rounds_completed"] == 3 and summary["headline"] == "evaluate"
    assert summary["final"]["accuracy"] == pytest.approx(0.8)


def test_bad_lora_targets_exit_2_before_any_run_directory(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    result = fedsim(
        "run",
        *sets(
            "strategy.name=flora",
            "peft.method=lora",
            "model.name=vit",
            "model.hidden=16",
            'peft.targets=["nope"]',
        ),
        out=out,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith(
        "fedsim: error: peft.targets: 'nope' matches no module of the model; "
        "linear layers it has: "
    )
    assert "q_proj" in line
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.slow
def test_plug_in_family_lists_and_runs_two_exchanges_per_round(
    tmp_path: Path, two_client_runs: dict[str, SharedRun]
) -> None:
    """Through the simulation runtime: ``fedsim list`` shows the plug-in; a run
    with a ping exchange before FedAvg's train completes (the server checks
    every doubled number), one row per (round, client, phase, metric), bytes
    summed over both exchanges; ``fraction-evaluate = 0``: no evaluate rows.
    The run: ``two_client_runs["ping"]``, 2 rounds of 2 clients (tests/conftest.py)."""
    env = plugin_env()
    listed = fedsim("list", out=tmp_path, env=env)
    assert listed.returncode == 0 and "ping" in listed.stdout
    assert "strategy.factor=3" in TWO_CLIENTS["ping"]
    run_dir = two_client_runs["ping"].run_dir
    rows = pd.read_parquet(run_dir / METRICS_FILE)
    assert not (rows["phase"] == "evaluate").any()
    clients = rows[rows["client"].notna()]
    assert not clients.duplicated(["round", "client", "phase", "metric"]).any()
    train = clients.pivot_table(
        index=["round", "client"], columns="metric", values="value"
    )
    assert len(train) == 4 and set(train["pings"]) == {1.0}  # 2 rounds x 2
    exp = load_experiment(None, ["model.name=mlp", "federation.clients=2"])
    data = federated_data(exp.data, 2, exp.seed)
    model = build_model(exp.model, data.info, exp.seed)
    weights = array_bytes(RecordDict({ARRAYS: ArrayRecord(model.state_dict())}))
    number = ArrayRecord({"n": Array(np.array([3.0]))})
    ping = array_bytes(RecordDict({ARRAYS: number}))
    assert set(train["bytes-down"]) == {weights + ping}
    assert set(train["bytes-up"]) == {weights + ping}
    summary = pd.read_json(run_dir / SUMMARY_FILE, typ="series")
    assert summary["status"] == "completed" and summary["rounds_completed"] == 2
