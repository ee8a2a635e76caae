"""SCAFFOLD (Karimireddy et al. 2020, option II): one round with two of three
clients equals a numpy/PyTorch oracle of the paper's Algorithm 1; the client's
control variate lives in its state; refusals (dp-fedavg, momentum)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from fedsim.clients.scaffold import STATE_KEY, ScaffoldClient
from fedsim.core import registry
from fedsim.core.errors import ConfigError
from fedsim.core.messages import ARRAYS, CONTROL
from fedsim.core.seeding import derive_seed
from fedsim.engine.server import resume_checkpoint
from fedsim.learn.base import build_model
from fedsim.learn.data import federated_data
from fedsim.learn.training import make_loader
from fedsim.protocol.setup import ServerSetup
from fedsim.strategies.scaffold.server import build
from tests.conftest import ScriptedGrid, experiment, reply_metadata

CPU = torch.device("cpu")
LR, SERVER_LR = 0.1, 0.8


def record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def oracle_client(model, train, x, c, c_i, seed):  # type: ignore[no-untyped-def]
    """Option II by hand: y <- y - lr (g(y) - c_i + c) over the seeded batches,
    then c_i+ = c_i - c + (x - y) / (K lr)."""
    y = {k: torch.from_numpy(v.copy()) for k, v in x.items()}
    steps = 0
    for xb, yb in make_loader(train, 32, seed=seed):
        p = {k: v.clone().requires_grad_(True) for k, v in y.items()}
        out = torch.func.functional_call(model, p, (xb,))
        grads = torch.autograd.grad(F.cross_entropy(out, yb), list(p.values()))
        for (k, v), g in zip(y.items(), grads, strict=True):
            y[k] = v - LR * (g + torch.from_numpy(c[k] - c_i[k]))
        steps += 1
    y_np = {k: v.numpy() for k, v in y.items()}
    new = {k: c_i[k] - c[k] + (x[k] - y_np[k]) / (steps * LR) for k in x}
    return y_np, new


@pytest.mark.usefixtures("task_identity", "one_thread")
def test_one_round_with_partial_participation_equals_option_ii() -> None:
    exp = experiment(
        "scaffold",
        "federation.clients=3",
        "train.momentum=0.0",
        f"train.lr={LR}",
        "train.epochs=1",
        "train.batch-size=32",
        f"strategy.server-lr={SERVER_LR}",
        "federation.fraction-train=1.0",
    )
    data = federated_data(exp.data, exp.federation.clients, exp.seed)
    model = build_model(exp.model, data.info, exp.seed)
    initial = ArrayRecord(model.state_dict())
    strategy = build(ServerSetup(exp, data, model, initial, CPU))
    rng = np.random.default_rng(0)
    names = [k for k, _ in model.named_parameters()]
    x = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    shapes = {k: x[k].shape for k in names}
    c = {k: rng.normal(0, 0.05, s).astype(np.float32) for k, s in shapes.items()}
    strategy.control = dict(c)
    messages = list(
        strategy.configure_train(
            1, initial, ConfigRecord(), ScriptedGrid({1: 0, 2: 1, 3: 2})
        )
    )
    assert len(messages) == 3
    for msg in messages:
        sent = {k: v.numpy() for k, v in msg.content[CONTROL].items()}
        assert all(np.array_equal(sent[k], c[k]) for k in names)

    client = ScaffoldClient(exp, data.info, CPU)
    replies, expected = [], []
    for pid in (0, 1):  # partial participation: |S| = 2 of N = 3
        c_i = {k: rng.normal(0, 0.05, s).astype(np.float32) for k, s in shapes.items()}
        state = RecordDict({STATE_KEY: record(c_i)})
        content = messages[pid].content
        out = client.train(content, data.client(pid), server_round=1, state=state)
        reply = Message(
            content=out, metadata=reply_metadata(pid + 1, "x", MessageType.TRAIN)
        )
        replies.append(reply)
        seed = derive_seed(exp.seed, "train", 1, pid)
        y, new = oracle_client(model, data.client(pid).train, x, c, c_i, seed)
        expected.append((y, new, c_i))
        kept = {k: v.numpy() for k, v in state[STATE_KEY].items()}
        up = {k: v.numpy() for k, v in out[CONTROL].items()}
        for k in names:
            np.testing.assert_allclose(kept[k], new[k], rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(up[k], new[k] - c_i[k], rtol=1e-4, atol=1e-5)

    new_x, _ = strategy.aggregate_train(1, replies)
    got = {k: v.numpy() for k, v in new_x.items()}
    for k in names:
        mean_dy = sum(y[k] - x[k] for y, _, _ in expected) / 2
        np.testing.assert_allclose(
            got[k], x[k] + SERVER_LR * mean_dy, rtol=1e-5, atol=1e-6
        )
        dc = sum(n[k] - ci[k] for _, n, ci in expected)
        np.testing.assert_allclose(
            strategy.control[k], c[k] + dc / 3, rtol=1e-4, atol=1e-6
        )
    # the server's c goes through the resume checkpoint
    saved = resume_checkpoint.unpack(
        resume_checkpoint.pack({"s": resume_checkpoint.strategy_state(strategy)})
    )
    fresh = build(ServerSetup(exp, data, model, initial, CPU))
    resume_checkpoint.restore_strategy(fresh, saved["s"])
    assert all(np.array_equal(fresh.control[k], strategy.control[k]) for k in names)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (("train.momentum=0.9",), "train.momentum"),
        (("train.momentum=0.0", "train.optimizer=adam"), "train.optimizer"),
    ],
)
def test_scaffold_refuses_local_optimisers_option_ii_does_not_fit(
    overrides: tuple, key: str
) -> None:
    exp = experiment("scaffold", *overrides)
    with pytest.raises(ConfigError, match=f"^{key}: "):
        registry.family("scaffold").run_check(exp, None, None)


def test_scaffold_refuses_dp_fedavg() -> None:
    family = registry.family("scaffold")
    assert "dp-fedavg" not in family.privacy and "dp-sgd" in family.privacy
    with pytest.raises(ConfigError, match="privacy.mechanism"):
        experiment(
            "scaffold",
            "train.momentum=0",
            "privacy.mechanism=dp-fedavg",
            "privacy.noise-multiplier=1.0",
        )


@pytest.mark.usefixtures("one_thread")
def test_scaffold_under_dp_sgd_keeps_both_states_and_option_ii() -> None:
    """DP-SGD composes: the accountant and ``c_i`` both live in the client's
    state, and ``c_i+`` is option II over the DP steps (noise-only ones too)."""
    from fedsim import privacy
    from fedsim.privacy import accounting, dp_sgd

    exp = experiment(
        "scaffold",
        "federation.clients=3",
        "train.momentum=0.0",
        f"train.lr={LR}",
        "train.epochs=1",
        "privacy.mechanism=dp-sgd",
        "privacy.noise-multiplier=1.0",
    )
    privacy.client_mechanism.cache_clear()
    data = federated_data(exp.data, exp.federation.clients, exp.seed)
    client = ScaffoldClient(exp, data.info, CPU)
    x = {k: v.detach().numpy().copy() for k, v in client.model.named_parameters()}
    c = {k: np.full_like(v, 0.01) for k, v in x.items()}
    content = RecordDict(
        {
            ARRAYS: ArrayRecord(client.model.state_dict()),
            CONTROL: record(c),
            "config": ConfigRecord({"server-round": 1}),
        }
    )
    state = RecordDict()
    out = client.train(content, data.client(0), server_round=1, state=state)
    assert dp_sgd.STATE_KEY in state and STATE_KEY in state
    train = data.client(0).train
    _, steps, _ = accounting.planned_steps(
        len(train), exp.train.batch_size, exp.train.epochs, exp.rounds
    )
    y = {k: v.numpy() for k, v in out[ARRAYS].items()}
    kept = {k: v.numpy() for k, v in state[STATE_KEY].items()}
    for k in x:
        want = -c[k] + (x[k] - y[k]) / (steps * LR)
        np.testing.assert_allclose(kept[k], want, rtol=1e-4, atol=1e-5)
    privacy.client_mechanism.cache_clear()


def test_scaffold_refuses_the_audit() -> None:
    with pytest.raises(ConfigError, match="^audit.attack: "):
        experiment("scaffold", "train.momentum=0", "audit.attack=inverting-gradients")
