"""FedPer: the body averaged as FedAvg (numpy oracle), the head never leaves a
client, and each client evaluates the shared body with its own head."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsim.clients.fedper import HEAD_STATE
from fedsim.core.errors import ConfigError
from fedsim.core.loading import load_experiment
from fedsim.core.messages import ARRAYS, METRICS, NUM_EXAMPLES
from fedsim.learn.base import build_model
from fedsim.learn.training import evaluate
from fedsim.strategies.fedper import check
from tests.conftest import run_rounds

TINY = (
    "strategy.name=fedper",
    "data.dataset=synthetic",
    "data.size=240",
    "model.name=mlp",
    "model.hidden=8",
    "federation.clients=3",
    "train.epochs=1",
)


def test_fedper_averages_the_body_and_keeps_heads_private(
    tmp_path, task_identity
) -> None:
    exp = load_experiment(None, list(TINY))
    _, grid, _ = run_rounds(exp, 2, tmp_path)
    by_round: dict[tuple[str, int], list] = {}
    for msg, reply in grid.log:
        key = (msg.metadata.message_type, int(msg.content["config"]["server-round"]))
        by_round.setdefault(key, []).append((msg, reply))
    for pairs in by_round.values():
        for msg, reply in pairs:
            sent = set(msg.content[ARRAYS])
            assert sent and not any(k.startswith("head.") for k in sent)
            if ARRAYS in reply.content:
                assert not any(k.startswith("head.") for k in reply.content[ARRAYS])
    # Round 2 sends the example-weighted mean of round 1's bodies.
    ups = [r.content for _, r in by_round[("train", 1)]]
    p = np.array([float(u[METRICS][NUM_EXAMPLES]) for u in ups])
    p /= p.sum()
    for msg, _ in by_round[("train", 2)]:
        for key, value in msg.content[ARRAYS].items():
            want = sum(pk * u[ARRAYS][key].numpy() for pk, u in zip(p, ups))
            np.testing.assert_allclose(value.numpy(), want, rtol=1e-6, atol=1e-7)
    # Each client evaluates the sent body with its own trained head.
    setup_model = build_model(exp.model, grid.data.info, exp.seed)
    node_of = {pid: node for node, pid in grid.partitions.items()}
    heads = []
    for msg, reply in by_round[("evaluate", 2)]:
        pid = int(reply.content[METRICS]["partition-id"])
        head = grid.states[node_of[pid]][HEAD_STATE].to_torch_state_dict()
        heads.append(head["head.weight"])
        body = msg.content[ARRAYS].to_torch_state_dict()
        setup_model.load_state_dict({**body, **head})
        stats = evaluate(setup_model, grid.data.client(pid).test, device="cpu")
        assert reply.content[METRICS]["accuracy"] == stats.accuracy
        assert reply.content[METRICS]["loss"] == stats.loss
    assert not torch.equal(heads[0], heads[1])  # personal heads


def test_fedper_needs_a_head_and_a_body() -> None:
    exp = load_experiment(None, list(TINY))
    body_only = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="model.name: FedPer"):
        check(exp, body_only, None)
    head_only = torch.nn.Module()
    head_only.head = torch.nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="nothing outside its head"):
        check(exp, head_only, None)
