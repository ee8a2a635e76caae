"""Split learning (SplitFed V1/V2, U-shaped) against plain-PyTorch oracles.

The protocols run through the real strategy, the real RecordingGrid and the
real client algorithm, in-process: :class:`InProcessGrid` answers each message
by calling the client algorithm's method for its action, with a per-node
``state`` as Flower's ``context.state``. No Flower runtime.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from flwr.app import Message, MessageType, Metadata, MetricRecord, RecordDict

from fedsim.core import registry
from fedsim.core.loading import load_experiment
from fedsim.core.messages import (
    METRICS,
    PARTITION_ID,
)
from fedsim.core.seeding import derive_seed
from fedsim.engine.recorder import RunRecorder
from fedsim.engine.recording import RecordingGrid, RecordingStrategy
from fedsim.engine.rounds import RoundDriver
from fedsim.engine.server_app import build
from fedsim.learn.split import batch_plan
from tests.conftest import ScriptedGrid

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
    """Answers every message with the client algorithm of its node, in-process;
    keeps what was sent and replied (``log``: (message, reply) pairs)."""

    def __init__(self, partitions: dict[int, int], exp: Any, data: Any):
        super().__init__(partitions)
        family = registry.family(exp.strategy.name)
        self.client = family.load_client()(exp, data.info, torch.device("cpu"))
        self.data = data
        self.states = {node: RecordDict() for node in partitions}
        self.log: list[tuple[Message, Message]] = []

    def answer(self, msg: Message, message_id: str) -> Message:
        node = msg.metadata.dst_node_id
        kind = msg.metadata.message_type
        if kind == MessageType.QUERY:
            return super().answer(msg, message_id)
        category, _, action = kind.partition(".")
        server_round = int(msg.content["config"]["server-round"])  # type: ignore[arg-type]
        content = getattr(self.client, action or category)(
            msg.content,
            self.data.client(self.partitions[node]),
            server_round=server_round,
            state=self.states[node],
        )
        if METRICS not in content:
            content[METRICS] = MetricRecord()
        content[METRICS][PARTITION_ID] = self.partitions[node]
        metadata = Metadata(
            run_id=1,
            message_id="",
            src_node_id=node,
            dst_node_id=0,
            reply_to_message_id=message_id,
            group_id="1",
            created_at=0.0,
            ttl=60.0,
            message_type=kind,
        )
        reply = Message(content=content, metadata=metadata)
        self.log.append((msg, reply))
        return reply


def run_rounds(exp: Any, rounds: int, tmp_path: Path) -> tuple[Any, InProcessGrid, Any]:
    """Drive ``rounds`` rounds of the experiment's split family in-process;
    returns the final global arrays, the grid and the recorder."""
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
    return load_experiment(None, [f"strategy.name={strategy}", *TINY, *overrides])


# -- SplitFed V1 against centralised training --------------------------------------


def test_sfl_v1_one_client_equals_centralised_sgd(
    task_identity: None, tmp_path: Path
) -> None:
    """One client, plain SGD, two epochs: the split run's global model equals the
    unsplit model trained centrally on the same batches, in the same order.
    Both sides compute the same float32 operations (the chain rule through the
    cut is exact), so only summation order may differ: 1e-6 absolute."""
    exp = experiment(
        "sfl-v1", "federation.clients=1", "train.epochs=2", "train.momentum=0.0"
    )
    final, _, _ = run_rounds(exp, 2, tmp_path)

    setup = build(exp)
    model = setup.model
    optimizer = torch.optim.SGD(model.parameters(), lr=exp.train.lr)
    train = setup.data.client(0).train
    for server_round in (1, 2):
        seed = derive_seed(exp.seed, "train", server_round, 0)
        for batch in batch_plan(len(train), 32, 2, seed=seed):
            optimizer.zero_grad()
            x, y = torch.from_numpy(train.x[batch]), torch.from_numpy(train.y[batch])
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    got = final.to_torch_state_dict()
    assert set(got) == set(model.state_dict())
    for name, value in model.state_dict().items():
        torch.testing.assert_close(got[name], value, atol=1e-6, rtol=0)
