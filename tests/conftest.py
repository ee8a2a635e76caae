"""Shared fixtures: real CLI runs through Flower's simulation runtime, scripted
grids without one, and in-process split-learning rounds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import psutil
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


#: A small, fast federation used by the end-to-end tests.
SMALL = (
    "rounds=3",
    "federation.clients=4",
    "model.name=mlp",
    "train.batch-size=32",
    "federation.fraction-evaluate=0.5",  # seeded sampling in every run
)


@dataclass
class CliRun:
    returncode: int
    stdout: str
    stderr: str
    out: Path
    #: the command line and environment, where a test checks how it ran
    argv: tuple[str, ...] = ()
    env: dict[str, str] | None = None
    #: every process seen under the CLI, and those still alive once it exited
    #: (:func:`sweep_cli` only)
    processes: frozenset[int] = frozenset()
    left_behind: frozenset[int] = frozenset()

    @property
    def run_dirs(self) -> list[Path]:
        return sorted(p for p in self.out.iterdir() if p.is_dir())

    @property
    def run_dir(self) -> Path:
        (only,) = self.run_dirs
        return only


def fedsim(
    *args: str, out: Path, timeout: float = 300, env: dict[str, str] | None = None
) -> CliRun:
    """Run the ``fedsim`` CLI in a subprocess, as a user would (``env``: the
    environment, default this process's)."""
    proc = subprocess.run(
        [sys.executable, "-m", "fedsim", *args, "--out", str(out)]
        if args and args[0] == "run"
        else [sys.executable, "-m", "fedsim", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    return CliRun(proc.returncode, proc.stdout, proc.stderr, out)


def sets(*pairs: str) -> list[str]:
    """``--set`` arguments for KEY=VALUE pairs."""
    return [arg for pair in pairs for arg in ("--set", pair)]


def descendants(pid: int) -> set[int]:
    """The processes under ``pid`` now."""
    try:
        return {p.pid for p in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def alive(pids: set[int]) -> set[int]:
    """Those of ``pids`` that still run (zombies count as gone)."""
    out = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.add(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def sweep_cli(
    out: Path,
    experiments: Sequence[Sequence[str]],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 900,
) -> tuple[CliRun, list[Path]]:
    """``fedsim sweep`` of ``experiments``, each the ``KEY=VALUE`` overrides a
    ``fedsim run --set ...`` of it would take: the quickstart as the sweep's base,
    one variant per experiment. Experiments that share ``federation.clients`` and
    ``[resources]`` share one Flower run (start-up paid once). Returns the CLI
    run and each experiment's run directory, in order; asserts that each run
    directory holds the experiment that ``fedsim run`` would have run (its name
    aside), so a test computes its oracle from its overrides as before."""
    import tomli_w

    from fedsim.core.loading import load_experiment, parse_override, to_toml

    out.mkdir(parents=True, exist_ok=True)
    file = out / "experiments.toml"
    variants = [dict(map(parse_override, overrides)) for overrides in experiments]
    file.write_text(
        to_toml(load_experiment(None)) + "\n" + tomli_w.dumps({"variants": variants})
    )
    argv = (
        sys.executable,
        "-m",
        "fedsim",
        "sweep",
        str(file),
        "--out",
        str(out / "runs"),
    )
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    with ThreadPoolExecutor(1) as pool:  # drain the pipes while watching
        streams = pool.submit(proc.communicate, timeout=timeout)
        seen: set[int] = set()
        while not streams.done():
            seen |= descendants(proc.pid)
            time.sleep(0.2)
        try:
            stdout, stderr = streams.result()
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    result = CliRun(
        proc.returncode,
        stdout,
        stderr,
        out,
        argv,
        env,
        processes=frozenset(seen),
        left_behind=frozenset(alive(seen)),  # as soon as the CLI exited
    )
    index = out / "runs" / file.stem / "sweep.json"
    assert index.is_file(), result.stdout + result.stderr
    entries = json.loads(index.read_text())["experiments"]
    run_dirs = [index.parent / entry["run_dir"] for entry in entries]
    assert len(run_dirs) == len(experiments)
    for run_dir, overrides in zip(run_dirs, experiments, strict=True):
        alone = load_experiment(None, overrides)
        swept = load_experiment(run_dir / "config.toml")
        assert replace(swept, name=alone.name) == alone, run_dir
    return result, run_dirs


#: The spy plug-ins (``hyperfl-spy``, ``split-ushape-spy``): on PYTHONPATH, their
#: dist-info registers them.
SPY = Path(__file__).parent / "spy"
#: The ``ping`` plug-in family, registered the same way.
PLUGIN = Path(__file__).parent / "plugin"

#: Runs through the CLI and Flower on two clients, one Flower run for all
#: (:func:`two_client_runs`): the spies of HyperFL (tests/test_hyperfl_e2e.py) and
#: of U-shaped split learning (tests/test_split_e2e.py), the ping plug-in
#: (tests/test_families.py), and HeteroFL, Pa3dFL and FedProphet on clients of
#: different capacity with PGD robust evaluation (tests/test_capacity_e2e.py).
CAPACITY = (
    "rounds=2",
    "federation.clients=2",
    "model.name=mlp",
    "model.hidden=8",
    "train.epochs=1",
    "train.batch-size=32",
    "robust.epsilon=0.1",
    "robust.steps=2",
)
TWO_CLIENTS: dict[str, tuple[str, ...]] = {
    "hyperfl-spy": (
        "strategy.name=hyperfl-spy",
        "rounds=2",
        "federation.clients=2",
        "model.name=mlp",
        "model.hidden=16",
        "train.epochs=1",
    ),
    "ping": (
        "strategy.name=ping",
        "strategy.factor=3",
        "rounds=2",
        "federation.clients=2",
        "federation.fraction-evaluate=0",
        "model.name=mlp",
    ),
    "split-ushape-spy": (
        "strategy.name=split-ushape-spy",
        "rounds=1",
        "federation.clients=2",
        "data.dataset=synthetic",
        "data.size=200",
        "model.name=mlp",
        "model.hidden=16",
        "train.epochs=1",
        "train.batch-size=32",
    ),
    "heterofl": (
        *CAPACITY,
        "strategy.name=heterofl",
        "strategy.capacities=[1.0, 0.5]",
    ),
    "pa3dfl": (
        *CAPACITY,
        "strategy.name=pa3dfl",
        "strategy.capacities=[1.0, 0.5]",
        "strategy.rank=4",
    ),
    "fedprophet": (
        *CAPACITY,
        "strategy.name=fedprophet",
        "strategy.memory-mb=[0.05, 0.02]",
        "strategy.local-iterations=2",
        "strategy.steps=2",
    ),
}
#: The key that tells each spy where to write what it sees.
SPY_DIR = {"hyperfl-spy": "strategy.spy-dir", "split-ushape-spy": "split.spy-dir"}


@dataclass(frozen=True)
class SharedRun:
    """One experiment of :func:`two_client_runs` or :func:`four_client_runs`."""

    run_dir: Path
    #: the sweep that ran it (processes, exit status)
    sweep: CliRun
    #: what the spy saw (spies only)
    seen: Path | None = None
    #: the run's FEDSIM_CACHE (four_client_runs)
    cache: Path | None = None


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


def console_script_env() -> tuple[Path, dict[str, str]]:
    """The ``fedsim`` console script of this environment, and this process's
    environment as a shell where that environment is not activated has it: its
    ``bin/`` not on ``PATH``, no ``VIRTUAL_ENV``."""
    script = Path(sys.executable).with_name("fedsim")
    here = str(script.parent)
    path = os.pathsep.join(
        p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != here
    )
    env = {**os.environ, "PATH": path or "/usr/bin:/bin"}
    env.pop("VIRTUAL_ENV", None)
    return script, env


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
        try:
            result, run_dirs = sweep_cli(root, list(experiments.values()), env=env)
        finally:
            registry.families.cache_clear()
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
    Each module defines its experiments. Asserts the sweep succeeded."""
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
    result, run_dirs = sweep_cli(
        root, list(experiments.values()), env={**os.environ, "FEDSIM_CACHE": str(cache)}
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return {
        name: SharedRun(run_dir, result, cache=cache)
        for name, run_dir in zip(experiments, run_dirs, strict=True)
    }


@pytest.fixture
def task_identity() -> Iterable[None]:
    """Messages take their run id from the process identity a ServerApp has."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None  # type: ignore[assignment]


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
    from fedsim.engine.server_app import build

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
    from fedsim.engine.recorder import RunRecorder
    from fedsim.engine.recording import RecordingGrid, RecordingStrategy
    from fedsim.engine.rounds import RoundDriver
    from fedsim.engine.server_app import build

    setup = build(exp)
    family = registry.family(exp.strategy.name)
    strategy = family.load_server()(setup)
    recorder = RunRecorder(tmp_path, exp)
    partitions = {100 + i: i for i in range(exp.federation.clients)}
    fake = InProcessGrid(partitions, exp, setup.data)
    grid = RecordingGrid(
        fake, recorder, num_clients=exp.federation.clients, min_replies=1
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
