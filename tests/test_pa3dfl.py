"""Pa3dFL against independent oracles: numpy attention, plain means, shapes,
the pFedHN step as a vector-Jacobian product, private state across rounds."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedsim.clients.pa3dfl import PRIVATE, Pa3dFLClient
from fedsim.core.capacity import capacity_of
from fedsim.core.loading import load_experiment
from fedsim.core.messages import ARRAYS, CONFIG, NUM_EXAMPLES, SERVER_ROUND
from fedsim.learn.capacity import sub_model, width_plan
from fedsim.learn.decomposed import DecomposedModel, personal_shapes
from fedsim.learn.models import CNN, MLP
from fedsim.strategies.pa3dfl.maths import attention_aggregate, plain_mean
from fedsim.strategies.pa3dfl.server import Generator, Pa3dFL, factor_plans, initial_general
from tests.conftest import ScriptedGrid, reply
from tests.test_heterofl import INFO, fake_client

RANK = 4
CAPACITIES = (1.0, 0.5, 0.25)


def test_attention_aggregation_is_the_formula() -> None:
    rng = np.random.default_rng(0)
    e, wq, wk, wv = (rng.normal(size=s) for s in [(5, 3), (3, 3), (3, 3), (3, 3)])
    got = attention_aggregate(*(torch.from_numpy(a) for a in (e, wq, wk, wv)))
    want = np.zeros_like(e)
    for i in range(5):
        q = wq @ e[i]
        scores = np.array([q @ (wk @ e[j]) / math.sqrt(3) for j in range(5)])
        weights = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()
        want[i] = e[i] + sum(weights[j] * (wv @ e[j]) for j in range(5))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)


def test_general_mean_is_plain() -> None:
    ups = [{"a.G": np.full((2, 2), v, np.float32)} for v in (1.0, 2.0, 6.0)]
    np.testing.assert_allclose(plain_mean(ups)["a.G"], np.full((2, 2), 3.0))
    with pytest.raises(ValueError, match="same general"):
        plain_mean([{"a.G": np.zeros(1)}, {"b.G": np.zeros(1)}])


@pytest.mark.parametrize(
    "build",
    [lambda: MLP(64, 8, 5, 0.0), lambda: CNN((1, 8, 8), 8, 5, 0.0)],
    ids=["mlp", "cnn"],
)
def test_decomposed_forward_is_the_sliced_model_with_u_g_v_weights(build) -> None:
    torch.manual_seed(0)
    full = build().double()
    model = DecomposedModel(full, 0.5, RANK).double()
    with torch.no_grad():
        for p in model.factors().values():
            p.normal_()
    plain = sub_model(full, 0.5)
    state = plain.state_dict()
    for name, f in model.factors().items():
        layer, part = name.rsplit(".", 1)
        if part == "G":
            u = model.factors()[f"{layer}.U"].detach().numpy()
            v = model.factors()[f"{layer}.V"].detach().numpy()
            w = u @ f.detach().numpy() @ v
            state[f"{layer}.weight"] = torch.from_numpy(
                w.reshape(state[f"{layer}.weight"].shape)
            )
    plain.load_state_dict(state)
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(model(x), plain(x), rtol=1e-10, atol=1e-12)


def strategy(clients: int = 3) -> tuple[Pa3dFL, MLP]:
    torch.manual_seed(0)
    model = MLP(64, 8, 10, 0.0)
    generator = Generator(
        clients, personal_shapes(model, RANK), embedding_dim=3, hidden_dim=6
    )
    return (
        Pa3dFL(
            generator,
            initial_general(model, generator),
            factor_plans(model, CAPACITIES, RANK),
            hyper_lr=0.1,
            hyper_momentum=0.9,
            min_available_nodes=clients,
        ),
        model,
    )


class FactorGrid(ScriptedGrid):
    """Train replies: G + pid + 1, U and V scaled by 0.5."""

    def respond(self, msg, message_id, node, pid):  # type: ignore[no-untyped-def]
        up = {
            k: a.numpy() + pid + 1 if k.endswith(".G") else a.numpy() * 0.5
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
        for layer in ("body.1", "body.4", "head"):
            out, *inputs = plan[f"{layer}.weight"]
            assert got[f"{layer}.U"] == (out, RANK)
            assert got[f"{layer}.V"] == (RANK, math.prod(inputs))
            assert got[f"{layer}.G"] == (RANK, RANK)
        replies.append(grid.answer(msg, f"m{i}"))
    strat.aggregate_train(1, replies)
    for k, g in general.items():  # mean of g + 1, g + 2, g + 3
        np.testing.assert_allclose(strat.general[k], g + 2, rtol=1e-5, atol=1e-6)

    # oracle: the vector-Jacobian product of the generated (sliced) factors with
    # delta = sent - returned = 0.5 * sent, averaged, then SGD's first step
    outs, deltas = [], []
    generated = before.personal(range(3))
    plan_of = factor_plans(model, CAPACITIES, RANK)
    for pid in range(3):
        for name, shape in plan_of(pid).items():
            value = generated[pid][name][tuple(slice(0, s) for s in shape)]
            outs.append(value)
            deltas.append(0.5 * value.detach() / 3)
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
            "strategy.rank=4",
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
