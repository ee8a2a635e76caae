"""Shared fixtures: real CLI runs through Flower's simulation runtime, scripted
grids without one, and in-process split-learning rounds."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    Error,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid

from fedsim.core.messages import ARRAYS, METRICS, PARTITION_ID
from tests.runs import (
    PLUGIN,
    SMALL,
    SPY,
    SPY_DIR,
    STRAY_RAY,
    TWO_CLIENTS,
    CliRun,
    SharedRun,
    console_script_env,
    fedsim,
    sets,
    sweep_cli,
)

__all__ = ["SMALL", "CliRun", "fedsim", "sets"]  # imported from here by tests


def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    """Tests marked ``compose`` (containers, minutes) run only when the marker
    expression names them (``pytest -m compose``)."""
    if "compose" in (config.option.markexpr or ""):
        return
    kept = [item for item in items if item.get_closest_marker("compose") is None]
    if len(kept) < len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in kept])
        items[:] = kept


@pytest.fixture(scope="session")
def run_cli(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., CliRun]:
    """``run_cli(experiment=None, overrides=(...))`` -> a finished CLI run."""

    def run(
        experiment: str | None = None,
        overrides: Sequence[str] = (),
        timeout: float = 300,
    ) -> CliRun:
        out = tmp_path_factory.mktemp("runs")
        args = ["run", *([experiment] if experiment else []), *sets(*overrides)]
        return fedsim(*args, out=out, timeout=timeout)

    return run


@pytest.fixture(scope="session")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> CliRun:
    """One small FedAvg run on digits, shared by every test that only reads it.

    Started as ``/path/to/venv/bin/fedsim run`` from a shell where the venv is
    not activated (:func:`console_script_env`), so that this one run also shows
    that the SuperLink finds Flower's executables without ``PATH``
    (``tests/test_api.py``)."""
    script, env = console_script_env()
    out = tmp_path_factory.mktemp("runs")
    argv = (str(script), "run", *sets(*SMALL), "--out", str(out))
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    result = CliRun(proc.returncode, proc.stdout, proc.stderr, out, argv, env)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="session")
def two_client_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SharedRun]:
    """The :data:`TWO_CLIENTS` through the CLI and Flower's simulation with the
    plug-ins importable, as one ``fedsim sweep``: one Flower run on their two
    SuperNodes, one experiment after the other (each equals it run alone:
    tests/test_sweep.py). Asserts the sweep succeeded."""
    from fedsim.core import registry

    root = tmp_path_factory.mktemp("two-clients")
    path = [str(SPY), str(PLUGIN)]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([*path, os.environ.get("PYTHONPATH", "")]),
    }
    experiments, seen = {}, {}
    for name, overrides in TWO_CLIENTS.items():
        if name in SPY_DIR:
            seen[name] = root / "seen" / name
            seen[name].mkdir(parents=True)
            overrides = (*overrides, f"{SPY_DIR[name]}={seen[name]}")
        experiments[name] = overrides
    with pytest.MonkeyPatch.context() as patch:  # sweep_cli reads the configs
        for folder in path:
            patch.syspath_prepend(folder)
        registry.families.cache_clear()
        registry.models.cache_clear()
        try:
            result, run_dirs = sweep_cli(root, list(experiments.values()), env=env)
        finally:
            registry.families.cache_clear()
            registry.models.cache_clear()
    assert result.returncode == 0, result.stdout + result.stderr
    return {
        name: SharedRun(run_dir, result, seen=seen.get(name))
        for name, run_dir in zip(experiments, run_dirs, strict=True)
    }


@pytest.fixture(scope="session")
def four_client_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SharedRun]:
    """Runs through the CLI and Flower on four clients, as one ``fedsim sweep``
    (one Flower run, one experiment after the other; each equals it run alone:
    tests/test_sweep.py): the DP experiments of tests/test_dp_e2e.py, FLoRA and
    FedIT of tests/test_lora_e2e.py (a ``FEDSIM_CACHE`` of their own for the
    pretrained base), and the run with failing clients of tests/test_e2e.py.
    Each module defines its experiments. Asserts the sweep succeeded. Runs
    with ``RAY_ADDRESS`` set (:data:`STRAY_RAY`), which a local run ignores."""
    from tests.test_dp_e2e import dp_experiments
    from tests.test_e2e import failing_experiment
    from tests.test_lora_e2e import FEDIT, FLORA

    root = tmp_path_factory.mktemp("four-clients")
    cache = root / "cache"
    experiments = {
        "failing": failing_experiment()[0],
        **dp_experiments(),
        "flora": FLORA,
        "fedit": FEDIT,
    }
    # a RAY_ADDRESS naming no cluster: a local run must not try it
    # (tests/test_cluster.py)
    env = {**os.environ, "FEDSIM_CACHE": str(cache), "RAY_ADDRESS": STRAY_RAY}
    result, run_dirs = sweep_cli(root, list(experiments.values()), env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return {
        name: SharedRun(run_dir, result, cache=cache)
        for name, run_dir in zip(experiments, run_dirs, strict=True)
    }


@pytest.fixture
def task_identity() -> Iterable[None]:
    """Messages take their run id from the process identity a ServerApp has."""
    from fedsim.flwr_private import set_task_identity

    set_task_identity(1, 0, 1)
    yield
    set_task_identity(None, None, None)


def reply_metadata(src: int, reply_to: str, message_type: str) -> Metadata:
    """The metadata of a reply from node ``src`` to message ``reply_to``."""
    return Metadata(
        run_id=1,
        message_id="",
        src_node_id=src,
        dst_node_id=0,
        reply_to_message_id=reply_to,
        group_id="1",
        created_at=0.0,
        ttl=60.0,
        message_type=message_type,
    )


def reply(
    arrays: dict[str, np.ndarray] | None,
    metrics: dict[str, float],
    src: int = 1,
    error: str | None = None,
    reply_to: str = "x",
) -> Message:
    """A train reply from node ``src`` to message ``reply_to``, as a ServerApp
    receives it."""
    content = RecordDict({METRICS: MetricRecord(metrics)})
    if arrays is not None:
        content[ARRAYS] = ArrayRecord(
            array_dict={k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}
        )
    metadata = reply_metadata(src, reply_to, MessageType.TRAIN)
    if error is not None:
        return Message(error=Error(code=0, reason=error), metadata=metadata)
    return Message(content=content, metadata=metadata)


def strategy_for(exp: Any) -> Any:
    """The family's server strategy for ``exp``, built as the ServerApp builds it."""
    from fedsim.core import registry
    from fedsim.engine.server.server_app import build

    return registry.family(exp.strategy.name).load_server()(build(exp))


class ScriptedGrid(Grid):
    """A Grid without a Flower runtime: each pushed message is answered at once
    by :meth:`answer` (subclasses script it); replies come back in reverse order,
    as replies arrive in any order."""

    def __init__(self, partitions: dict[int, int]):
        self.partitions = partitions  # node id -> partition id
        self.sent: list[Message] = []
        self.waiting: dict[str, Message] = {}

    def set_run(self, run: object) -> None: ...

    @property
    def run(self) -> object:
        return None

    def create_message(self, *args: object, **kwargs: object) -> Message:
        raise AssertionError("unused")

    def get_node_ids(self) -> Iterable[int]:
        return list(self.partitions)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            self.sent.append(msg)
            ids.append(f"m{len(self.sent)}")
            self.waiting[ids[-1]] = self.answer(msg, ids[-1])
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        ready = [self.waiting.pop(i) for i in message_ids if i in self.waiting]
        return ready[::-1]

    def send_and_receive(self, *args: object, **kwargs: object) -> Iterable[Message]:
        raise AssertionError("RecordingGrid pushes and polls itself")

    def answer(self, msg: Message, message_id: str) -> Message:
        """The reply of ``msg``'s node: the partition-id query is answered here,
        any other message by :meth:`respond`."""
        node = msg.metadata.dst_node_id
        if msg.metadata.message_type == MessageType.QUERY:
            return ScriptedGrid.respond(
                self, msg, message_id, node, self.partitions[node]
            )
        return self.respond(msg, message_id, node, self.partitions[node])

    def respond(self, msg: Message, message_id: str, node: int, pid: int) -> Message:
        """The reply of node ``node`` (partition ``pid``) to ``msg``; subclasses
        script it (by default: its partition id, as to the query)."""
        return reply(None, {PARTITION_ID: pid}, src=node, reply_to=message_id)


# -- split learning in-process (tests/test_split*.py, AMAQ, SFPrompt) ------------

#: Tiny runs: 300 synthetic examples, the mlp (hidden 16), batches of 32.
TINY = (
    "data.dataset=synthetic",
    "data.size=300",
    "model.name=mlp",
    "model.hidden=16",
    "train.batch-size=32",
    "seed=3",
)

#: A tiny SFPrompt ViT (no pre-training): 16 wide, 2 heads, 2 blocks of 4x4
#: patches, cut after block 0 (head: the embedding and ``blocks.0``).
TINY_SFPROMPT = (
    "strategy.name=sfprompt",
    "model.name=vit",
    "model.hidden=16",
    "model.heads=2",
    "model.depth=2",
    "model.patch-size=4",
    "split.cut=blocks.0",
)


class InProcessGrid(ScriptedGrid):
    """Answers every message with a client algorithm, in-process, with a
    per-node ``state`` as Flower's ``context.state``; two client instances take
    turns, as two actors could, so nothing may live in the client process
    between messages. Keeps what was sent and replied (``log``: (message, reply)
    pairs)."""

    def __init__(self, partitions: dict[int, int], exp: Any, data: Any):
        from fedsim.core import registry

        super().__init__(partitions)
        family = registry.family(exp.strategy.name)
        make = family.load_client()
        self.clients = [make(exp, data.info, torch.device("cpu")) for _ in range(2)]
        self.data = data
        self.states = {node: RecordDict() for node in partitions}
        self.log: list[tuple[Message, Message]] = []

    def respond(self, msg: Message, message_id: str, node: int, pid: int) -> Message:
        kind = msg.metadata.message_type
        category, _, action = kind.partition(".")
        server_round = int(msg.content["config"]["server-round"])  # type: ignore[arg-type]
        client = self.clients[len(self.log) % 2]
        content = getattr(client, action or category)(
            msg.content,
            self.data.client(pid),
            server_round=server_round,
            state=self.states[node],
        )
        if METRICS not in content:
            content[METRICS] = MetricRecord()
        content[METRICS][PARTITION_ID] = pid
        reply = Message(
            content=content, metadata=reply_metadata(node, message_id, kind)
        )
        self.log.append((msg, reply))
        return reply


def run_rounds(exp: Any, rounds: int, tmp_path: Path) -> tuple[Any, InProcessGrid, Any]:
    """Drive ``rounds`` rounds of the experiment's split family in-process;
    returns the final global arrays, the grid and the recorder."""
    from fedsim.core import registry
    from fedsim.engine.server.exchange_recording import RecordingGrid
    from fedsim.engine.server.round_driver import RoundDriver
    from fedsim.engine.server.run_recorder import RunRecorder
    from fedsim.engine.server.server_app import build
    from fedsim.engine.server.strategy_recording import RecordingStrategy

    setup = build(exp)
    family = registry.family(exp.strategy.name)
    strategy = family.load_server()(setup)
    recorder = RunRecorder(tmp_path, exp)
    partitions = {100 + i: i for i in range(exp.federation.clients)}
    fake = InProcessGrid(partitions, exp, setup.data)
    grid = RecordingGrid(
        fake, recorder, num_clients=exp.federation.clients
    )
    driver = RoundDriver(
        RecordingStrategy(strategy, recorder, seed=exp.seed),
        grid,
        recorder,
        evaluate=None,
        rounds=rounds,
        timeout=5,
    )
    final = driver.run(setup.initial)
    return final, fake, recorder


def training_rows(frame: Any) -> Any:
    """A run's metrics without what may differ between identical trainings: the
    timings (``seconds``, ``elapsed``) and the audit's rows (``attack-psnr``,
    ``recovered`` and their per-attack ``<metric>/<attack>``); sorted."""
    base = frame["metric"].str.split("/").str[0]
    timing = base.isin(["seconds", "elapsed", "attack-psnr", "recovered"])
    return (
        frame[~timing]
        .sort_values(["round", "phase", "metric", "client"])
        .reset_index(drop=True)
    )


def experiment(strategy: str, *overrides: str) -> Any:
    """A :data:`TINY` split experiment of family ``strategy``."""
    from fedsim.core.loading import load_experiment

    return load_experiment(None, [f"strategy.name={strategy}", *TINY, *overrides])


@pytest.fixture
def one_thread() -> Iterable[None]:
    """Tiny tensors: a second thread only adds contention on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def hf_assets(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Tiny random-init Hugging Face model folders (LLaMA, GPT-2, BERT) with a
    tokenizer trained here, and instruction / labelled text files
    (:mod:`tests.hf_assets`)."""
    from tests.hf_assets import make_assets

    return make_assets(tmp_path_factory.mktemp("hf"))
