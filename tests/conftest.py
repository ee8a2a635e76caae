"""Shared fixtures: real CLI runs through Flower's simulation runtime."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
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
def small_run(run_cli: Callable[..., CliRun]) -> CliRun:
    """One small FedAvg run on digits, shared by every test that only reads it."""
    result = run_cli(overrides=SMALL)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture
def task_identity() -> Iterable[None]:
    """Messages take their run id from the process identity a ServerApp has."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None  # type: ignore[assignment]


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
    metadata = Metadata(
        run_id=1,
        message_id="",
        src_node_id=src,
        dst_node_id=0,
        reply_to_message_id=reply_to,
        group_id="1",
        created_at=0.0,
        ttl=60.0,
        message_type=MessageType.TRAIN,
    )
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
        """The reply of ``msg``'s node; the partition-id query is answered here."""
        node = msg.metadata.dst_node_id
        return reply(
            None, {PARTITION_ID: self.partitions[node]}, src=node, reply_to=message_id
        )
