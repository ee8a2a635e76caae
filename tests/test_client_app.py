"""The ClientApp in-process: local training against a plain PyTorch oracle, and
what a client process builds once."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    RecordDict,
)

from fedsim.core.loading import load_experiment, to_run_config
from fedsim.core.messages import ARRAYS, CONFIG, METRICS, NUM_EXAMPLES, PARTITION_ID
from fedsim.core.seeding import derive_seed
from fedsim.engine.client import client_app
from fedsim.learn.base import build_model
from fedsim.learn.data import federated_data
from fedsim.learn.training import make_loader

OVERRIDES = ["federation.clients=4", "model.name=mlp", "train.epochs=2", "seed=7"]


pytestmark = pytest.mark.usefixtures("task_identity")


def message(arrays: ArrayRecord, server_round: int, kind: str) -> Message:
    content = RecordDict(
        {ARRAYS: arrays, CONFIG: ConfigRecord({"server-round": server_round})}
    )
    msg = Message(content, dst_node_id=5, message_type=kind)
    # a received message carries its id; replies point at it
    msg.metadata._message_id = msg.object_id  # noqa: SLF001
    return msg


def context(pid: int, run_config: dict) -> Context:
    return Context(
        run_id=1,
        node_id=5,
        node_config={PARTITION_ID: pid, "num-partitions": 4},
        state=RecordDict(),
        run_config=run_config,
    )


def test_train_reply_equals_plain_pytorch_sgd_on_the_same_batches() -> None:
    exp = load_experiment(None, OVERRIDES)
    run_config = to_run_config(exp)
    data = federated_data(exp.data, 4, exp.seed)
    global_model = build_model(exp.model, data.info, exp.seed)
    with torch.no_grad():  # a global model that is not the initial one
        for p in global_model.parameters():
            p.add_(0.01)
    arrays = ArrayRecord({k: v.clone() for k, v in global_model.state_dict().items()})

    reply = client_app.train(
        message(arrays, 3, MessageType.TRAIN), context(2, run_config)
    )
    metrics = reply.content[METRICS]
    assert metrics[PARTITION_ID] == 2
    assert metrics[NUM_EXAMPLES] == len(data.client(2).train)

    # oracle: the same seed, batches and optimizer, written out by hand
    seed = derive_seed(exp.seed, "train", 3, 2)
    torch.manual_seed(seed)
    model = build_model(exp.model, data.info, 0)
    model.load_state_dict(global_model.state_dict())
    train = data.client(2).train
    # the same batches: the loader the product builds for this client and round
    loader = make_loader(train, exp.train.batch_size, seed=seed)
    opt = torch.optim.SGD(
        model.parameters(), lr=exp.train.lr, momentum=exp.train.momentum
    )
    losses = []
    for _ in range(exp.train.epochs):
        for xb, yb in loader:
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()) * len(yb))
    got = reply.content[ARRAYS].to_torch_state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(got[name], value, rtol=1e-6, atol=1e-7)
    assert metrics["loss"] == pytest.approx(
        sum(losses) / (len(train) * exp.train.epochs)
    )


def test_evaluate_reply_is_the_local_test_accuracy() -> None:
    exp = load_experiment(None, OVERRIDES)
    data = federated_data(exp.data, 4, exp.seed)
    model = build_model(exp.model, data.info, exp.seed)
    arrays = ArrayRecord(model.state_dict())
    reply = client_app.evaluate(
        message(arrays, 1, MessageType.EVALUATE), context(1, to_run_config(exp))
    )
    test = data.client(1).test
    with torch.no_grad():
        logits = model(torch.from_numpy(test.x))
    expected = float((logits.argmax(1).numpy() == test.y).mean())
    assert reply.content[METRICS]["accuracy"] == pytest.approx(expected)
    assert reply.content[METRICS][NUM_EXAMPLES] == len(test)


def test_a_partition_assigned_in_the_message_wins_over_the_node_config() -> None:
    exp = load_experiment(None, OVERRIDES)
    data = federated_data(exp.data, 4, exp.seed)
    arrays = ArrayRecord(build_model(exp.model, data.info, exp.seed).state_dict())
    msg = message(arrays, 1, MessageType.EVALUATE)
    msg.content[CONFIG][PARTITION_ID] = 3  # the simulation server's assignment
    reply = client_app.evaluate(msg, context(1, to_run_config(exp)))
    assert reply.content[METRICS][PARTITION_ID] == 3
    assert reply.content[METRICS][NUM_EXAMPLES] == len(data.client(3).test)


def test_a_client_process_builds_data_and_model_once() -> None:
    exp = load_experiment(None, [*OVERRIDES, "seed=11"])
    run_config = to_run_config(exp)
    data = federated_data(exp.data, 4, exp.seed)
    arrays = ArrayRecord(build_model(exp.model, data.info, exp.seed).state_dict())
    before = client_app._runtime.cache_info()  # noqa: SLF001
    client_app.train(message(arrays, 1, MessageType.TRAIN), context(0, run_config))
    runtime = client_app.runtime(run_config)
    model = runtime.algorithm.model
    for server_round, pid in [(1, 1), (2, 0), (2, 3)]:
        client_app.train(
            message(arrays, server_round, MessageType.TRAIN), context(pid, run_config)
        )
    client_app.evaluate(
        message(arrays, 2, MessageType.EVALUATE), context(2, run_config)
    )
    after = client_app._runtime.cache_info()  # noqa: SLF001
    assert after.misses - before.misses == 1  # built once for five messages
    assert client_app.runtime(run_config).algorithm.model is model
    assert client_app.runtime(run_config).data is data  # the cached partitions


def test_simulated_failures_are_reproducible() -> None:
    exp = load_experiment(None, ["federation.failure-rate=0.5", "seed=3"])
    outcomes = []
    for _ in range(2):
        row = []
        for pid in range(10):
            try:
                client_app.maybe_fail(exp, 4, pid)
                row.append(False)
            except client_app.SimulatedClientFailure:
                row.append(True)
        outcomes.append(row)
    assert outcomes[0] == outcomes[1] and 0 < sum(outcomes[0]) < 10
    rate = np.mean(
        [
            np.random.default_rng(derive_seed(3, "failure", 4, pid)).random() < 0.5
            for pid in range(10)
        ]
    )
    assert sum(outcomes[0]) == rate * 10
