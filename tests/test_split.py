"""Split learning (SplitFed V1/V2, U-shaped) against plain-PyTorch oracles.

The protocols run through the real strategy, the real RecordingGrid and the
real client algorithm, in-process: ``tests.conftest.InProcessGrid`` answers each message
by calling the client algorithm's method for its action, with a per-node
``state`` as Flower's ``context.state``. No Flower runtime.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fedsim.core.messages import (
    ACTIVATIONS,
    CUT,
    GRADIENT,
    SPLIT_STEP,
)
from fedsim.core.seeding import derive_seed
from fedsim.engine.server.server_app import build
from fedsim.learn.codecs import decode
from fedsim.learn.split import batch_plan, from_record
from fedsim.strategies.split.maths import serving_order
from tests.conftest import experiment, run_rounds

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


def test_cut_gradient_equals_autograd_of_the_unsplit_model(
    task_identity: None, tmp_path: Path
) -> None:
    """The first gradient sent down equals ``torch.autograd.grad(loss, a)`` of
    the unsplit initial model, ``a`` the output of the cut layer (a forward hook
    on ``body.2``), on the client's first batch."""
    exp = experiment("sfl-v1", "federation.clients=1", "split.cut=body.2")
    _, grid, _ = run_rounds(exp, 1, tmp_path)
    (msg, _), *_ = [
        (m, r) for m, r in grid.log if m.metadata.message_type.endswith(SPLIT_STEP)
    ]
    sent = decode(grid.clients[0].codec, GRADIENT, from_record(msg.content[CUT]))

    setup = build(exp)
    model = setup.model
    train = setup.data.client(0).train
    batch = batch_plan(len(train), 32, 1, seed=derive_seed(exp.seed, "train", 1, 0))[0]
    seen: list[torch.Tensor] = []
    model.body[2].register_forward_hook(lambda m, i, out: seen.append(out))
    loss = F.cross_entropy(
        model(torch.from_numpy(train.x[batch])), torch.from_numpy(train.y[batch])
    )
    (expected,) = torch.autograd.grad(loss, seen[0])
    np.testing.assert_allclose(sent, expected.numpy(), atol=1e-7, rtol=0)
    assert sent.shape == (32, 16)


def reference_v2(exp: Any, rounds: int, clients: int) -> dict[str, torch.Tensor]:
    """SplitFed V2 in plain PyTorch, with its own modules: per round, every
    client copies the global client part (the mlp's ``body[:3]``), the one
    server part (``body[3:]`` + ``head``) serves the clients one after another
    in the strategy's seeded order, each batch one SGD step (momentum) of both
    parts; then the client parts are averaged by examples."""
    setup = build(exp)
    model = setup.model
    lr, momentum = exp.train.lr, exp.train.momentum
    for server_round in range(1, rounds + 1):
        server = torch.nn.Sequential(*model.body[3:], model.head)
        server_opt = torch.optim.SGD(server.parameters(), lr=lr, momentum=momentum)
        order = serving_order(
            [100 + p for p in range(clients)],
            derive_seed(exp.seed, "sfl-v2-order", server_round),
        )
        trained, sizes = {}, {}
        for node in order:
            pid = node - 100
            head = copy.deepcopy(torch.nn.Sequential(*model.body[:3]))
            opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum)
            train = setup.data.client(pid).train
            seed = derive_seed(exp.seed, "train", server_round, pid)
            for batch in batch_plan(len(train), 32, exp.train.epochs, seed=seed):
                opt.zero_grad()
                server_opt.zero_grad()
                x, y = (
                    torch.from_numpy(train.x[batch]),
                    torch.from_numpy(train.y[batch]),
                )
                F.cross_entropy(server(head(x)), y).backward()
                opt.step()
                server_opt.step()
            trained[pid], sizes[pid] = head.state_dict(), len(train)
        total = sum(sizes.values())
        with torch.no_grad():
            for name, p in torch.nn.Sequential(*model.body[:3]).named_parameters():
                p.copy_(sum(trained[k][name] * (sizes[k] / total) for k in trained))
    return model.state_dict()


def test_sfl_v2_three_clients_equals_a_plain_pytorch_loop(
    task_identity: None, tmp_path: Path
) -> None:
    """Three clients, SGD with momentum 0.9 (the client's momentum buffer goes
    through ``context.state`` between messages), two rounds."""
    exp = experiment("sfl-v2", "federation.clients=3", "train.momentum=0.9")
    final, _, recorder = run_rounds(exp, 2, tmp_path)
    expected = reference_v2(exp, 2, 3)
    data = build(exp).data
    per_epoch = sum(-(-len(data.client(p).train) // 32) for p in range(3))
    batches = exp.train.epochs * per_epoch
    exchanges = [
        v for (_, c, phase, m, v) in recorder.rows if m == "exchanges" and c is None
    ]
    assert exchanges == [1 + batches] * 2  # the opening one, then one per batch
    got = final.to_torch_state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, atol=2e-6, rtol=0)


def test_ushape_one_client_equals_centralised_and_keeps_labels_home(
    task_identity: None, tmp_path: Path
) -> None:
    """U-shaped with one client is centralised SGD too; no message to the
    server carries labels or raw inputs (only the cut's encoded tensors, and
    the client's head and tail weights at the end)."""
    exp = experiment(
        "split-ushape", "federation.clients=1", "train.momentum=0.0", "split.cut=body.1"
    )
    final, grid, _ = run_rounds(exp, 1, tmp_path)
    setup = build(exp)
    model = setup.model
    optimizer = torch.optim.SGD(model.parameters(), lr=exp.train.lr)
    train = setup.data.client(0).train
    for batch in batch_plan(
        len(train), 32, exp.train.epochs, seed=derive_seed(exp.seed, "train", 1, 0)
    ):
        optimizer.zero_grad()
        x, y = torch.from_numpy(train.x[batch]), torch.from_numpy(train.y[batch])
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    got = final.to_torch_state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(got[name], value, atol=1e-6, rtol=0)

    head_weights = {"body.1.weight", "body.1.bias", "head.weight", "head.bias"}
    for _, reply in grid.log:
        names = {
            f"{r}|{k}" for r, rec in reply.content.array_records.items() for k in rec
        }
        assert all(
            n.startswith((f"{CUT}|{ACTIVATIONS}.", f"{CUT}|{GRADIENT}."))
            or n.split("|")[1] in head_weights
            for n in names
        ), names
        for rec in reply.content.array_records.values():
            for array in rec.values():
                a = array.numpy()
                assert not (
                    a.dtype.kind in "iu"
                    and a.size >= 2
                    and np.isin(a, train.y).all()
                    and a.ndim == 1
                    and a.dtype == train.y.dtype
                )
                assert not any(np.isin(row, a).all() for row in train.x[:50])
