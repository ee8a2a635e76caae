"""FedProphet against independent oracles: byte counts by hand, PGD radius,
masked averaging, APA/DMA rules, a coordinated stage advance."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MessageType, RecordDict

from fedsim.clients.fedprophet import FedProphetClient
from fedsim.core.errors import ConfigError
from fedsim.core.loading import load_experiment
from fedsim.core.messages import ARRAYS, METRICS, NUM_EXAMPLES
from fedsim.engine.server import resume_checkpoint
from fedsim.learn.cascade import atoms, aux_head, build_cascade, partition
from fedsim.learn.models import CNN, MLP
from fedsim.learn.robust import feature_pgd, pgd
from fedsim.strategies.fedprophet.maths import (
    adjust_alpha,
    apa_due,
    feature_epsilon,
    masked_average,
    prophet_modules,
    should_advance,
)
from fedsim.strategies.fedprophet.server import FedProphet
from tests.conftest import ScriptedGrid, reply
from tests.test_heterofl import INFO, fake_client


def mlp_bytes(d: int, h: int, c: int, batch: int) -> list[tuple[int, int]]:
    """(atom bytes, aux-head bytes) of MLP(d, h, c) by hand: float32, SGD
    momentum (3 copies of each parameter), outputs of a batch."""
    layer1 = 3 * (d * h + h) + batch * h + batch * d  # + the input batch
    layer2 = 3 * (h * h + h) + batch * h
    head = 3 * (h * c + c) + batch * c
    aux = 3 * (h * c + c) + batch * (h + c)
    return [(4 * layer1, 4 * aux), (4 * layer2, 4 * aux), (4 * head, 0)]


@pytest.mark.parametrize("budget", [0.075e6, 0.14e6, 0.2e6, 1e6])
def test_partition_fits_the_budget_and_is_greedy(budget: float) -> None:
    model, batch = MLP(64, 64, 10, 0.0), 16
    part = partition(
        atoms(model, (1, 8, 8)), num_classes=10, batch_size=batch, budget=budget
    )
    sizes = mlp_bytes(64, 64, 10, batch)
    assert [i for m in part.modules for i in m] == [0, 1, 2]
    for k, module in enumerate(part.modules):
        last = k == len(part.modules) - 1
        want = sum(sizes[i][0] for i in module) + (0 if last else sizes[module[-1]][1])
        assert part.memory[k] == want <= budget
        if not last:  # the next atom did not fit
            nxt = module[-1] + 1
            grown = sum(sizes[i][0] for i in (*module, nxt)) + sizes[nxt][1] * (nxt < 2)
            assert grown > budget
    with pytest.raises(ConfigError, match="strategy.memory-mb"):
        partition(
            atoms(model, (1, 8, 8)), num_classes=10, batch_size=batch, budget=0.05e6
        )


def test_cnn_atoms_and_the_reference_aux_head() -> None:
    parts = atoms(CNN((1, 8, 8), 16, 10, 0.0), (1, 8, 8))
    assert [a.name for a in parts] == ["features.0", "features.2", "fc.0", "head"]
    assert [a.out_shape for a in parts] == [(16, 8, 8), (512,), (16,), (10,)]
    head = aux_head((16, 8, 8), 10)  # pooled to ceil(sqrt(10/16)) = 1 per side
    assert head(torch.zeros(2, 16, 8, 8)).shape == (2, 10)
    assert sum(p.numel() for p in head.parameters()) == 16 * 10 + 10


def test_feature_pgd_stays_within_epsilon_and_non_negative() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 3))
    z = torch.relu(torch.randn(32, 6))
    y = torch.randint(0, 3, (32,))
    adv = pgd(net, z, y, epsilon=0.3, steps=5, step_size=0.2, bounds=(0.0, math.inf))
    assert float((adv - z).abs().max()) <= 0.3 + 1e-6 and float(adv.min()) >= 0.0
    assert float((adv - z).abs().max()) > 0.25  # it moved to the boundary


def test_feature_pgd_reaches_the_maximal_feature_distance() -> None:
    """For a linear feature map ``m(x) = A x`` the distance ``||A d||^2`` is
    convex in ``d``, so its maximum over the L-inf ball is at a corner: brute
    force over all corners is the oracle. Rank one (``A = c a^T``): the corner
    ``eps sign(a)`` from any start, distance ``eps ||c|| ||a||_1``."""
    torch.manual_seed(0)
    eps, dim = 0.1, 4
    corners = torch.tensor(
        [[(i >> b) & 1 for b in range(dim)] for i in range(2**dim)],
        dtype=torch.float32,
    )
    corners = (2 * corners - 1) * eps
    a, c = torch.randn(dim), torch.randn(3)
    rank_one = torch.outer(c, a)
    x = torch.rand(16, dim)
    adv = feature_pgd(
        lambda v: v @ rank_one.T,
        x,
        epsilon=eps,
        steps=10,
        step_size=0.025,
        bounds=None,
        generator=torch.Generator().manual_seed(1),
    )
    moved = ((adv - x) @ rank_one.T).norm(dim=1)
    best = (corners @ rank_one.T).norm(dim=1).max()
    assert float(best) == pytest.approx(eps * float(c.norm() * a.abs().sum()), rel=1e-5)
    torch.testing.assert_close(moved, best.expand(16), rtol=1e-5, atol=1e-6)
    # full rank: from each random start signed ascent ends at a corner that is
    # a KKT point of the box-constrained maximum (the gradient 2 A^T A d points
    # outward in every coordinate), the best start at the brute-force maximum
    full = torch.randn(3, dim)
    adv = feature_pgd(
        lambda v: v @ full.T,
        x,
        epsilon=eps,
        steps=10,
        step_size=0.025,
        bounds=None,
        generator=torch.Generator().manual_seed(2),
    )
    delta = adv - x
    torch.testing.assert_close(delta.abs(), torch.full_like(x, eps))
    moved = (delta @ full.T).norm(dim=1)
    assert bool(((delta @ full.T @ full) * delta >= 0).all())
    best = (corners @ full.T).norm(dim=1).max()
    assert float(moved.max()) == pytest.approx(float(best), rel=1e-5)
    y = torch.randint(0, 3, (16,))
    ce = pgd(
        lambda v: v @ full.T,
        x,
        y,
        epsilon=eps,
        steps=10,
        step_size=0.025,
        bounds=None,
        generator=torch.Generator().manual_seed(2),
    )
    assert float(((ce - x) @ full.T).norm(dim=1).mean()) <= float(moved.mean()) + 1e-6


def test_apa_runs_on_the_reference_schedule() -> None:
    # 20 rounds a stage: past round int(0.05 * 20) = 1, every int(0.1 * 20) = 2
    assert [k for k in range(1, 21) if apa_due(k, 20)] == list(range(2, 21, 2))
    # 40: past round 2, every 4
    assert [k for k in range(1, 41) if apa_due(k, 40)] == list(range(4, 41, 4))
    # under 10 rounds a stage the period is one round (the reference's is 0)
    assert [k for k in range(1, 9) if apa_due(k, 8)] == list(range(1, 9))


def test_masked_averaging_touches_only_trained_modules() -> None:
    current = {
        "a": np.zeros(2, np.float32),
        "b": np.ones(2, np.float32),
        "aux.0.w": np.full(2, 5.0, np.float32),
    }
    uploads = [
        ({"a": np.full(2, 2.0), "aux.0.w": np.full(2, 1.0)}, 1.0),
        ({"a": np.full(2, 5.0)}, 2.0),
    ]
    out = masked_average(current, uploads)
    np.testing.assert_allclose(out["a"], (2.0 * 1 + 5.0 * 2) / 3)
    np.testing.assert_array_equal(out["b"], current["b"])  # nobody trained it
    np.testing.assert_allclose(out["aux.0.w"], 1.0)
    assert out["a"].dtype == np.float32


def test_apa_dma_and_stage_rules() -> None:
    assert feature_epsilon([2.0, 4.0], 9) == pytest.approx(1.0)
    assert adjust_alpha(0.5, [1.0, 1.3], 1.0, 0.3) == pytest.approx(0.6)
    assert adjust_alpha(0.5, [0.8, 0.8], 1.0, 0.3) == pytest.approx(0.4)
    assert adjust_alpha(0.35, [0.8], 1.0, 0.3) == pytest.approx(0.3)
    assert adjust_alpha(0.5, [1.0], 1.0, 0.3) == 0.5
    memory = [70, 60, 50]
    assert [prophet_modules(0, memory, b) for b in (70, 130, 179, 180)] == [0, 1, 1, 2]
    assert prophet_modules(1, memory, 1e9) == 1
    assert should_advance(5, 5, 0, 3) and should_advance(2, 5, 3, 3)
    assert not should_advance(2, 5, 2, 3)


class ProphetGrid(ScriptedGrid):
    """Train replies: the arrays sent, + 1; evaluate: fixed accuracies;
    perturbation: norm 2 per partition + 1."""

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        return list(self.pull_messages(self.push_messages(messages)))

    def respond(self, msg, message_id, node, pid):  # type: ignore[no-untyped-def]
        if msg.metadata.message_type == MessageType.TRAIN:
            up = {k: a.numpy() + 1 for k, a in msg.content[ARRAYS].items()}
            return reply(up, {NUM_EXAMPLES: 1}, src=node, reply_to=message_id)
        metrics = {
            "perturbation": 2.0 * (pid + 1),
            "feature-dim": 4.0,
            "feature-min": 0.0,
        }
        return reply(None, metrics, src=node, reply_to=message_id)


def test_dma_content_masked_round_and_stage_advance(task_identity: None) -> None:
    exp = load_experiment(
        None,
        [
            "strategy.name=fedprophet",
            "model.name=mlp",
            "strategy.memory-mb=[0.15, 0.08]",
        ],
    )
    model = MLP(64, 64, 10, 0.0)
    cascade = build_cascade(model, (1, 8, 8), 10, batch_size=16, budget=0.08e6, seed=0)
    assert len(cascade.part.modules) == 2
    arrays = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    arrays.update(cascade.aux_arrays(0))
    opts = exp.strategy.options
    strat = FedProphet(
        dict(arrays), cascade.part, cascade.names, opts, rounds=4, min_available_nodes=2
    )
    grid = ProphetGrid({41: 0, 42: 1})
    messages = list(strat.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    sent = {grid.partitions[m.metadata.dst_node_id]: m for m in messages}
    # partition 0 (0.15 MB) also trains module 1; partition 1 (0.08 MB) does not
    assert sent[0].content["config"]["prophets"] == 1
    assert sent[1].content["config"]["prophets"] == 0
    assert set(sent[1].content[ARRAYS]) == {
        *cascade.names[0],
        "aux.0.1.weight",
        "aux.0.1.bias",
    }
    replies = [grid.answer(m, f"m{i}") for i, m in enumerate(messages)]
    strat.aggregate_train(1, replies)
    for k in cascade.names[0]:
        np.testing.assert_allclose(strat.arrays[k], arrays[k] + 1, rtol=1e-6)
    for k in cascade.names[1]:  # only partition 0 trained it
        np.testing.assert_allclose(strat.arrays[k], arrays[k] + 1, rtol=1e-6)
    strat.coordinate(1, {"accuracy": 0.5, "robust-accuracy": 0.25}, grid, timeout=5)
    assert strat.stage == 0  # 2 rounds per stage
    strat.coordinate(2, {"accuracy": 0.6, "robust-accuracy": 0.3}, grid, timeout=5)
    assert strat.stage == 1 and strat.alpha == opts.eps_quantile
    assert strat.epsilon == pytest.approx(math.sqrt(((2.0 + 4.0) / 2) ** 2 / 4))
    assert strat.last_ratio == pytest.approx(2.0)
    # the measurement ran at the radius of the stage's best alpha (1.0 in stage 0)
    sent = [m for m in grid.sent if m.metadata.message_type.endswith("perturbation")]
    assert sent and all(m.content["config"]["epsilon"] == 0.1 for m in sent)
    # the server state survives a checkpoint into a fresh strategy
    strat.ratios = [1.5, 2.5]
    state = resume_checkpoint.unpack(resume_checkpoint.pack(strat.checkpoint_state()))
    fresh = FedProphet(
        dict(arrays), cascade.part, cascade.names, opts, rounds=4, min_available_nodes=2
    )
    fresh.restore_state(state)
    for key in (*FedProphet.SCALARS, "ratios"):
        assert getattr(fresh, key) == getattr(strat, key), key
        assert type(getattr(fresh, key)) is type(getattr(strat, key)), key
    for key, value in strat.arrays.items():
        np.testing.assert_array_equal(fresh.arrays[key], value)
        assert fresh.arrays[key].dtype == value.dtype


def test_client_trains_assigned_modules_from_cached_inputs() -> None:
    exp = load_experiment(
        None,
        [
            "strategy.name=fedprophet",
            "model.name=mlp",
            "strategy.local-iterations=2",
            "strategy.memory-mb=[0.15, 0.08]",
            "train.batch-size=16",
        ],
    )
    client = FedProphetClient(exp, INFO, torch.device("cpu"))
    full = {k: v.detach() for k, v in client.model.state_dict().items()}
    full.update(
        {k: torch.from_numpy(v) for k, v in client.cascade.aux_arrays(0).items()}
    )

    def content(stage: int, prophets: int) -> RecordDict:
        config = {
            "stage": stage,
            "prophets": prophets,
            "epsilon": 0.1,
            "bounded": 1,
            "server-round": 1,
        }
        return RecordDict({ARRAYS: ArrayRecord(full), "config": ConfigRecord(config)})

    out = client.train(
        content(1, 0), fake_client(0), server_round=1, state=RecordDict()
    )
    assert set(out[ARRAYS]) == set(client.cascade.names[1])
    cached = client.cache[(0, 1)]
    with torch.no_grad():
        want = client.cascade.net(0, 0)(torch.from_numpy(fake_client(0).train.x))
    torch.testing.assert_close(cached, want)
    assert out[METRICS]["memory-mb"] == client.cascade.part.memory[1] / 1e6
    pert = client.perturbation(
        content(0, 0), fake_client(0), server_round=1, state=RecordDict()
    )[METRICS]
    assert pert["feature-dim"] == 64 and pert["perturbation"] > 0
