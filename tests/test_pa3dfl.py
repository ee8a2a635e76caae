"""Pa3dFL against independent oracles: the paper's decomposition by loops,
numpy attention, plain means, shapes, the pFedHN step as a vector-Jacobian
product, private state across rounds, the server state across a checkpoint."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedsim.clients.pa3dfl import PRIVATE, Pa3dFLClient
from fedsim.core.capacity import capacity_of
from fedsim.core.errors import ConfigError
from fedsim.core.loading import load_experiment
from fedsim.core.messages import ARRAYS, CONFIG, NUM_EXAMPLES, SERVER_ROUND
from fedsim.engine.server import resume_checkpoint
from fedsim.learn.capacity import sub_model, width_plan
from fedsim.learn.decomposed import (
    DecomposedModel,
    compose,
    factors_of,
    general_for,
    scaled_general_for,
)
from fedsim.learn.models import CNN, MLP
from fedsim.strategies.pa3dfl.maths import attention_aggregate, plain_mean
from fedsim.strategies.pa3dfl.server import (
    Generator,
    Pa3dFL,
    factor_plans,
    initial_general,
)
from tests.conftest import ScriptedGrid, reply
from tests.test_heterofl import INFO, fake_client

CAPACITIES = (1.0, 0.5, 0.25)


def test_attention_aggregation_is_the_formula() -> None:
    """Eq. 9 by hand: s_i = E' e'_i, e_i^(l) = E'^T softmax(s_i / tau_l)."""
    rng = np.random.default_rng(0)
    e, tau = rng.normal(size=(5, 3)), np.array([0.5, 1.0, 3.0])
    got = attention_aggregate(torch.from_numpy(e), torch.from_numpy(tau))
    assert got.shape == (3, 5, 3)
    for layer, t in enumerate(tau):
        for i in range(5):
            scores = np.array([e[j] @ e[i] for j in range(5)]) / t
            weights = np.exp(scores - scores.max())
            weights /= weights.sum()
            want = sum(weights[j] * e[j] for j in range(5))
            np.testing.assert_allclose(got[layer, i].numpy(), want, rtol=1e-12)


def test_general_mean_is_plain() -> None:
    ups = [{"a.u": np.full((2, 2), v, np.float32)} for v in (1.0, 2.0, 6.0)]
    np.testing.assert_allclose(plain_mean(ups)["a.u"], np.full((2, 2), 3.0))
    with pytest.raises(ValueError, match="same general"):
        plain_mean([{"a.u": np.zeros(1)}, {"b.u": np.zeros(1)}])


def test_decomposition_sizes_follow_eq_5() -> None:
    cnn = factors_of(CNN((1, 8, 8), 8, 5, 0.0), CAPACITIES)
    # conv 1 -> 16 (3x3): R1 = 16 * 0.25, R2 = max(min(1, 16), 9)
    assert (cnn["features.0"].r1, cnn["features.0"].r2) == (4, 9)
    assert cnn["features.0"].general_shape == (4, 9, 9)
    assert cnn["features.0"].personal_shape == (9, 4, 1)
    # conv 16 -> 32: R2 = max(min(16, 32), 9) = 16
    assert (cnn["features.2"].r1, cnn["features.2"].r2) == (8, 16)
    # linear: R2 = R1; the head keeps all outputs: R1 = T, one block
    assert (cnn["fc.0"].r1, cnn["fc.0"].r2) == (2, 2)
    assert (cnn["head"].r1, cnn["head"].r2, cnn["head"].blocks) == (5, 5, 1)
    with pytest.raises(ConfigError, match="strategy.capacities"):
        factors_of(MLP(64, 8, 5, 0.0), (1.0, 0.6, 0.25))  # 0.6 keeps 5 of 8


@pytest.mark.parametrize(
    "build",
    [lambda: MLP(64, 8, 5, 0.0), lambda: CNN((1, 8, 8), 8, 5, 0.0)],
    ids=["mlp", "cnn"],
)
@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.25])
def test_decomposed_forward_is_the_sliced_model_with_paper_weights(
    build, ratio: float
) -> None:
    """Every weight entry by the paper's definition, in loops: unit (j, i) =
    j R1 + i has kernel u_i @ v_j; the client holds every u_i and the blocks
    v_j, j < p / p_min, on its first p S inputs."""
    torch.manual_seed(0)
    full = build().double()
    factors = factors_of(full, CAPACITIES)
    model = DecomposedModel(full, ratio, factors).double()
    with torch.no_grad():
        for p in model.factors().values():
            p.normal_()
    plain = sub_model(full, ratio)
    state = plain.state_dict()
    for name, f in factors.items():
        u = model.factors()[f"{name}.u"].detach().numpy()
        v = model.factors()[f"{name}.v"].detach().numpy()
        shape = state[f"{name}.weight"].shape
        assert u.shape == (f.r1, f.kernel, f.r2)
        assert v.shape == (f.r2, shape[0] // f.r1, shape[1])
        w = np.zeros((shape[0], shape[1], f.kernel))
        for j in range(shape[0] // f.r1):
            for i in range(f.r1):
                for s in range(shape[1]):
                    w[j * f.r1 + i, s] = u[i] @ v[:, j, s]
        state[f"{name}.weight"] = torch.from_numpy(w.reshape(shape))
    plain.load_state_dict(state)
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(model(x), plain(x), rtol=1e-10, atol=1e-12)


def test_general_init_is_the_least_squares_fit() -> None:
    torch.manual_seed(0)
    u, v = torch.randn(4, 9, 6, dtype=torch.float64), torch.randn(6, 3, 5).double()
    weight = compose(u, v, (12, 5, 3, 3))
    torch.testing.assert_close(general_for(weight, v, 4), u)  # exact when it can be
    noisy = weight + 0.1 * torch.randn_like(weight)
    fit = general_for(noisy, v, 4)
    best = (compose(fit, v, noisy.shape) - noisy).norm()
    for _ in range(5):  # no nearby u fits better
        other = fit + 1e-3 * torch.randn_like(fit)
        assert (compose(other, v, noisy.shape) - noisy).norm() >= best


def test_scaled_general_init_keeps_the_fit_direction_and_the_weight_norm() -> None:
    torch.manual_seed(1)
    v = torch.randn(4, 3, 5, dtype=torch.float64)  # R2 = 4 < what 12 x 5 needs
    weight = torch.randn(12, 5, dtype=torch.float64)
    fit = general_for(weight, v, 4)
    scaled = scaled_general_for(weight, v, 4)
    composed = compose(scaled, v, weight.shape)
    # numpy oracle: the norm of the weight the factors compose to
    np.testing.assert_allclose(
        np.linalg.norm(composed.numpy()), np.linalg.norm(weight.numpy()), rtol=1e-12
    )
    assert np.linalg.norm(compose(fit, v, weight.shape).numpy()) < np.linalg.norm(
        weight.numpy()
    )  # the plain fit is too small: only part of the weight is expressible
    ratio = scaled.numpy() / fit.numpy()
    np.testing.assert_allclose(ratio, ratio.flat[0], rtol=1e-12)  # same direction
    assert ratio.flat[0] > 1


def strategy(clients: int = 3) -> tuple[Pa3dFL, MLP]:
    torch.manual_seed(0)
    model = MLP(64, 8, 10, 0.0)
    factors = factors_of(model, CAPACITIES)
    shapes = {f"{n}.v": torch.Size(f.personal_shape) for n, f in factors.items()}
    generator = Generator(clients, shapes, embedding_dim=3, hidden_dim=6)
    return (
        Pa3dFL(
            generator,
            initial_general(model, generator, factors),
            factor_plans(model, CAPACITIES, factors),
            hyper_lr=0.1,
            hyper_momentum=0.9,
            min_available_nodes=clients,
        ),
        model,
    )


class FactorGrid(ScriptedGrid):
    """Train replies: u + pid + 1, v scaled by 0.5."""

    def respond(self, msg, message_id, node, pid):  # type: ignore[no-untyped-def]
        up = {
            k: a.numpy() + pid + 1 if k.endswith(".u") else a.numpy() * 0.5
            for k, a in msg.content[ARRAYS].items()
        }
        return reply(up, {NUM_EXAMPLES: 1}, src=node, reply_to=message_id)


def test_a_round_sizes_personal_factors_averages_general_steps_generator(
    task_identity: None,
) -> None:
    strat, model = strategy()
    before = copy.deepcopy(strat.generator)
    general = {k: v.copy() for k, v in strat.general.items()}
    grid = FactorGrid({31: 0, 32: 1, 33: 2})
    messages = list(strat.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    replies = []
    for i, msg in enumerate(messages):
        pid = grid.partitions[msg.metadata.dst_node_id]
        plan = width_plan(model, capacity_of(CAPACITIES, pid))
        got = {k: tuple(a.shape) for k, a in msg.content[ARRAYS].items()}
        for layer, r1 in (("body.1", 2), ("body.4", 2), ("head", 10)):
            out, inputs = plan[f"{layer}.weight"]
            assert got[f"{layer}.u"] == (r1, 1, r1)  # linear: R2 = R1
            assert got[f"{layer}.v"] == (r1, out // r1, inputs)
        replies.append(grid.answer(msg, f"m{i}"))
    strat.aggregate_train(1, replies)
    for k, g in general.items():  # mean of g + 1, g + 2, g + 3
        np.testing.assert_allclose(strat.general[k], g + 2, rtol=1e-5, atol=1e-6)

    # oracle: the vector-Jacobian product of the generated (sliced) factors with
    # delta = sent - returned = 0.5 * sent, summed over the clients (pFedHN's
    # per-client step), then SGD's first step
    outs, deltas = [], []
    generated = before.personal(range(3))
    plan_of = factor_plans(model, CAPACITIES, factors_of(model, CAPACITIES))
    for pid in range(3):
        for name, shape in plan_of(pid).items():
            value = generated[pid][name][tuple(slice(0, s) for s in shape)]
            outs.append(value)
            deltas.append(0.5 * value.detach())
    params = list(before.parameters())
    grads = torch.autograd.grad(outs, params, grad_outputs=deltas)
    for (name, new), old, g in zip(strat.generator.named_parameters(), params, grads):
        torch.testing.assert_close(new.detach(), old.detach() - 0.1 * g, msg=name)


def test_private_biases_survive_rounds_and_stay_per_client() -> None:
    exp = load_experiment(
        None,
        [
            "strategy.name=pa3dfl",
            "federation.clients=4",
            "model.name=mlp",
            "model.hidden=8",
        ],
    )
    client = Pa3dFLClient(exp, INFO, torch.device("cpu"))
    strat, _ = strategy(clients=4)
    fresh = {k: v.clone() for k, v in client.model_for(0)[1].items()}

    def content(pid: int) -> RecordDict:
        arrays = ArrayRecord(strat.content_for(pid))
        return RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord({SERVER_ROUND: 1})})

    state = RecordDict()
    client.train(content(0), fake_client(0), server_round=1, state=state)
    after_one = state[PRIVATE].to_torch_state_dict()
    assert any(not torch.equal(after_one[k], fresh[k]) for k in fresh)
    # partition 3 has the same width (entry 3 mod 3 = 0) and the same process
    other = RecordDict()
    client.load(content(3), other, 3)
    model, _ = client.model_for(3)
    for k, v in model.biases().items():
        torch.testing.assert_close(v, fresh[k])
    client.load(content(0), state, 0)
    for k, v in model.biases().items():
        torch.testing.assert_close(v, after_one[k])
    out = client.train(content(0), fake_client(0), server_round=2, state=state)
    after_two = state[PRIVATE].to_torch_state_dict()
    assert any(not torch.equal(after_two[k], after_one[k]) for k in fresh)
    assert set(out[ARRAYS]) == set(strat.content_for(0))
    assert out["metrics"]["width"] == 1.0


def test_server_state_survives_a_checkpoint(task_identity: None) -> None:
    strat, _ = strategy()
    grid = FactorGrid({31: 0, 32: 1, 33: 2})
    for rnd in (1, 2):  # two steps: momentum buffers exist
        messages = list(strat.configure_train(rnd, ArrayRecord(), ConfigRecord(), grid))
        strat.aggregate_train(
            rnd, [grid.answer(m, f"m{i}") for i, m in enumerate(messages)]
        )
    state = resume_checkpoint.unpack(resume_checkpoint.pack(strat.checkpoint_state()))
    fresh, _ = strategy()
    fresh.restore_state(state)
    for pid in range(3):
        for k, v in strat.content_for(pid).items():
            torch.testing.assert_close(fresh.content_for(pid)[k], v, rtol=0, atol=0)
    # the next step is the same too (momentum restored)
    for s in (strat, fresh):
        messages = list(s.configure_train(3, ArrayRecord(), ConfigRecord(), grid))
        s.aggregate_train(3, [grid.answer(m, f"m{i}") for i, m in enumerate(messages)])
    for (name, a), b in zip(
        strat.generator.named_parameters(), fresh.generator.parameters()
    ):
        torch.testing.assert_close(a, b, msg=name)  # sum order may differ
