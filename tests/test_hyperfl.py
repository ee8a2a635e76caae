"""HyperFL, HyperFL-LPM and the local-only baseline, against independent oracles.

The families are found through the ``fedsim.strategies`` entry points (fedsim's
``pyproject.toml``): reinstall the package after adding them.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import Array, ArrayRecord, ConfigRecord, MessageType, RecordDict
from torch import nn

from fedsim.clients.hyperfl import EMBEDDING, PRIVATE, HyperFLClient
from fedsim.clients.local import MODEL, LocalClient
from fedsim.core.errors import ConfigError
from fedsim.core.loading import load_experiment
from fedsim.core.messages import ARRAYS, CONFIG, NUM_EXAMPLES, SERVER_ROUND
from fedsim.learn.data import federated_data
from fedsim.learn.hypernet import (
    GroupClippedSGD,
    HyperModel,
    HyperNetwork,
    extractor_shapes,
)
from fedsim.learn.models import CNN, MLP
from fedsim.strategies.hyperfl.server import HyperFL, initial_hypernetwork
from tests.conftest import ScriptedGrid, fedsim, reply, sets

SMALL = ("federation.clients=3", "model.name=mlp", "model.hidden=8")


def hyper_model(target: nn.Module, *, dtype: torch.dtype = torch.float32) -> HyperModel:
    torch.manual_seed(0)
    net = HyperNetwork(extractor_shapes(target), embedding_dim=4, hidden_dim=6)
    model = HyperModel(target, net).to(dtype)
    with torch.no_grad():
        model.embedding.normal_()
    return model


@pytest.mark.parametrize(
    "target",
    [lambda: MLP(16, 8, 3, 0.0), lambda: CNN((1, 4, 4), 8, 3, 0.0)],
    ids=["mlp", "cnn"],
)
def test_generated_weights_in_a_plain_copy_give_the_same_logits(target) -> None:
    torch.manual_seed(1)
    model = hyper_model(target())
    plain = copy.deepcopy(model.target)
    generated = {k: v.detach() for k, v in model.generate().items()}
    assert set(generated) == {n for n, _ in plain.named_parameters()} - {
        "head.weight",
        "head.bias",
    }
    plain.load_state_dict(generated, strict=False)
    x = torch.randn(5, 16) if isinstance(plain, MLP) else torch.randn(5, 1, 4, 4)
    model.eval(), plain.eval()
    assert torch.equal(model(x), plain(x))


def test_hypernetwork_gradient_equals_reference_two_step_and_finite_differences() -> (
    None
):
    """One autograd graph through the generated weights gives the reference's
    gradients: dL/dW on a plain model holding W, pushed back through the
    hypernetwork (a vector-Jacobian product); and central differences agree."""
    torch.manual_seed(2)
    model = hyper_model(MLP(6, 5, 3, 0.0), dtype=torch.float64)
    x, y = torch.randn(7, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    shared = [*model.hypernetwork.parameters(), model.embedding]

    F.cross_entropy(model(x), y).backward()
    ours = [p.grad.clone() for p in shared]  # type: ignore[union-attr]

    weights = model.generate()
    plain = copy.deepcopy(model.target)
    leaves = dict(plain.named_parameters())
    with torch.no_grad():
        for name, w in weights.items():
            leaves[name].copy_(w)
            leaves[name].requires_grad_(True)
    loss = F.cross_entropy(plain(x), y)
    names = list(weights)
    d_w = torch.autograd.grad(loss, [leaves[n] for n in names])
    reference = torch.autograd.grad(
        [weights[n] for n in names], shared, grad_outputs=d_w
    )
    for got, want in zip(ours, reference):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)

    rng = np.random.default_rng(0)
    eps = 1e-6
    with torch.no_grad():
        for p, g in zip(shared, ours):
            flat, grad = p.view(-1), g.view(-1)
            for i in rng.choice(flat.numel(), size=3, replace=False):
                old = float(flat[i])
                flat[i] = old + eps
                up = float(F.cross_entropy(model(x), y))
                flat[i] = old - eps
                down = float(F.cross_entropy(model(x), y))
                flat[i] = old
                assert (up - down) / (2 * eps) == pytest.approx(
                    float(grad[i]), rel=1e-5, abs=1e-8
                )


def test_group_clipping_clips_each_group_to_the_norm() -> None:
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.tensor([30.0, 40.0, 0.0]), torch.tensor([3.0, 4.0])
    opt = GroupClippedSGD(
        [[a], [b]], max_grad_norm=10.0, lr=1.0, momentum=0.0, weight_decay=0.0
    )
    opt.step()
    torch.testing.assert_close(a.detach(), torch.tensor([-6.0, -8.0, 0.0]))
    torch.testing.assert_close(b.detach(), torch.tensor([-3.0, -4.0]))  # under 10


def hypernet_arrays(seed: int, shapes: dict) -> dict[str, np.ndarray]:
    torch.manual_seed(seed)
    net = HyperNetwork(shapes, embedding_dim=4, hidden_dim=6)
    return {k: v.detach().numpy() for k, v in net.state_dict().items()}


def test_server_aggregation_is_the_example_weighted_mean(task_identity: None) -> None:
    shapes = extractor_shapes(MLP(6, 5, 3, 0.0))
    initial = hypernet_arrays(0, shapes)
    strategy = HyperFL(ArrayRecord({k: Array(v) for k, v in initial.items()}))
    uploads = [hypernet_arrays(s, shapes) for s in (1, 2, 3)]
    weights = [10, 30, 5]
    replies = [
        reply(up, {"loss": 1.0, NUM_EXAMPLES: n}, src=i + 1)
        for i, (up, n) in enumerate(zip(uploads, weights))
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None and set(arrays) == set(initial)
    p = np.array(weights, dtype=np.float64) / sum(weights)
    for key in initial:
        want = sum(pk * up[key].astype(np.float64) for pk, up in zip(p, uploads))
        np.testing.assert_allclose(arrays[key].numpy(), want, rtol=1e-6, atol=1e-7)

    leaky = dict(uploads[0], embedding=np.zeros(4, dtype=np.float32))
    with pytest.raises(ValueError, match="other arrays than the hypernetwork"):
        strategy.aggregate_train(2, [reply(leaky, {NUM_EXAMPLES: 1})])


class HyperGrid(ScriptedGrid):
    """Train replies: the hypernetwork plus the partition id; evaluate: metrics."""

    def respond(self, msg, message_id, node, pid):  # type: ignore[no-untyped-def]
        if msg.metadata.message_type == MessageType.TRAIN:
            up = {k: a.numpy() + pid for k, a in msg.content[ARRAYS].items()}
            return reply(up, {NUM_EXAMPLES: 1}, src=node, reply_to=message_id)
        self.evaluated = {k: a.numpy() for k, a in msg.content[ARRAYS].items()}
        metrics = {"accuracy": 1.0, "loss": 0.0, NUM_EXAMPLES: 1}
        return reply(None, metrics, src=node, reply_to=message_id)


def test_a_round_averages_the_hypernetwork_and_evaluates_with_it(
    task_identity: None, tmp_path: Path
) -> None:
    from fedsim.engine.server.exchange_recording import RecordingGrid
    from fedsim.engine.server.round_driver import RoundDriver
    from fedsim.engine.server.run_recorder import RunRecorder
    from fedsim.engine.server.strategy_recording import RecordingStrategy

    exp = load_experiment(None, ["strategy.name=hyperfl", *SMALL])
    shapes = extractor_shapes(MLP(6, 5, 3, 0.0))
    initial = hypernet_arrays(0, shapes)
    family = HyperFL(ArrayRecord({k: Array(v) for k, v in initial.items()}))
    recorder = RunRecorder(tmp_path, exp, headline="evaluate")
    fake = HyperGrid({11: 0, 12: 1, 13: 2})
    grid = RecordingGrid(fake, recorder, num_clients=3)
    strategy = RecordingStrategy(family, recorder, seed=0)
    RoundDriver(strategy, grid, recorder, evaluate=None, rounds=2, timeout=5).run(None)
    for key, value in initial.items():  # each round adds the mean pid, 1
        np.testing.assert_allclose(family.shared[key].numpy(), value + 2, rtol=1e-6)
        np.testing.assert_allclose(fake.evaluated[key], value + 2, rtol=1e-6)


# -- the client ------------------------------------------------------------------


@pytest.fixture(scope="module")
def small() -> tuple:
    exp = load_experiment(None, ["strategy.name=hyperfl", "train.epochs=1", *SMALL])
    data = federated_data(exp.data, exp.federation.clients, exp.seed)
    return exp, data


def content(
    arrays: dict[str, torch.Tensor] | ArrayRecord, server_round: int
) -> RecordDict:
    record = arrays if isinstance(arrays, ArrayRecord) else ArrayRecord(arrays)
    return RecordDict(
        {ARRAYS: record, CONFIG: ConfigRecord({SERVER_ROUND: server_round})}
    )


def first_hypernetwork(exp, client: HyperFLClient) -> ArrayRecord:  # type: ignore[no-untyped-def]
    net = initial_hypernetwork(
        extractor_shapes(client.model.target), exp.strategy.options, exp.seed
    )
    return ArrayRecord({k: v.detach() for k, v in net.state_dict().items()})


def test_private_state_survives_rounds_on_another_client_instance(small) -> None:  # type: ignore[no-untyped-def]
    """Round 2 on a fresh client instance (another actor) given the node's state
    continues from round 1's embedding and head: the same as on the instance
    that ran round 1, and not what a re-initialised client computes."""
    exp, data = small
    cpu = torch.device("cpu")
    one = HyperFLClient(exp, data.info, cpu)
    hyper = first_hypernetwork(exp, one)
    mine = data.client(1)
    state = RecordDict()
    first = one.train(content(hyper, 1), mine, server_round=1, state=state)
    after_one = state[PRIVATE].to_torch_state_dict()
    seeded = one.initial_private(1)
    assert not torch.equal(after_one[EMBEDDING], seeded[EMBEDDING])
    assert set(first[ARRAYS]) == set(hyper)  # the reply: the hypernetwork only

    twin = copy.deepcopy(state)
    other = HyperFLClient(exp, data.info, cpu)
    other.load(content(hyper, 2), state, 1)
    assert torch.equal(other.model.embedding.detach(), after_one[EMBEDDING])
    other.train(content(first[ARRAYS], 2), mine, server_round=2, state=state)
    one.train(content(first[ARRAYS], 2), mine, server_round=2, state=twin)
    fresh_state = RecordDict()
    HyperFLClient(exp, data.info, cpu).train(
        content(first[ARRAYS], 2), mine, server_round=2, state=fresh_state
    )
    got = state[PRIVATE].to_torch_state_dict()
    for key, value in twin[PRIVATE].to_torch_state_dict().items():
        assert torch.equal(got[key], value)
    assert not torch.equal(
        got[EMBEDDING], fresh_state[PRIVATE].to_torch_state_dict()[EMBEDDING]
    )


def test_seeded_private_init_depends_on_the_partition(small) -> None:  # type: ignore[no-untyped-def]
    exp, data = small
    client = HyperFLClient(exp, data.info, torch.device("cpu"))
    a, b = client.initial_private(0), client.initial_private(1)
    assert torch.equal(a[EMBEDDING], client.initial_private(0)[EMBEDDING])
    assert not torch.equal(a[EMBEDDING], b[EMBEDDING])
    assert not torch.equal(a["head.weight"], b["head.weight"])


def test_the_local_client_keeps_its_model_in_its_state(small) -> None:  # type: ignore[no-untyped-def]
    exp, data = small
    exp = load_experiment(None, ["strategy.name=local", *SMALL])
    cpu = torch.device("cpu")
    state = RecordDict()
    empty = content(ArrayRecord(), 1)
    one = LocalClient(exp, data.info, cpu)
    assert ARRAYS not in one.train(empty, data.client(0), server_round=1, state=state)
    after = state[MODEL].to_torch_state_dict()
    other = LocalClient(exp, data.info, cpu)
    other.load(RecordDict(), state)
    for key, value in after.items():
        assert torch.equal(other.model.state_dict()[key], value)
        assert not torch.equal(value, one.initial[key]) or "bias" in key


def test_dp_sgd_is_rejected_with_exit_2_and_its_reason(tmp_path: Path) -> None:
    overrides = ["strategy.name=hyperfl", "privacy.mechanism=dp-sgd"]
    with pytest.raises(ConfigError, match="hyperfl' cannot run under privacy"):
        load_experiment(None, [*overrides, "privacy.noise-multiplier=1.0"])
    result = fedsim("run", *sets(*overrides), out=tmp_path / "runs")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "per-sample gradients" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


# -- HyperFL-LPM -----------------------------------------------------------------

LPM = (
    "strategy.name=hyperfl-lpm",
    "peft.method=lora",
    "model.name=vit",
    "model.hidden=16",
    "model.depth=1",
    "model.heads=2",
    "peft.rank=2",
    'peft.targets=["q_proj", "v_proj"]',
    "federation.clients=2",
)


def test_lpm_generated_lora_equals_the_merged_plain_model() -> None:
    """The frozen base with generated LoRA factors gives the logits of a plain
    copy of the base whose adapted weights are W + (alpha / r) B A."""
    from fedsim.clients.hyperfl import LpmClient
    from fedsim.learn.base import build_model
    from fedsim.learn.hypernet import lora_shapes

    exp = load_experiment(None, list(LPM))
    data = federated_data(exp.data, exp.federation.clients, exp.seed)
    client = LpmClient(exp, data.info, torch.device("cpu"))
    plain = build_model(exp.model, data.info, exp.seed)
    assert set(client.model.hypernetwork.shapes) == set(lora_shapes(plain, exp.peft))
    with torch.no_grad():
        client.model.embedding.normal_()
        generated = client.model.generate()
        for name in ("blocks.0.attn.q_proj", "blocks.0.attn.v_proj"):
            a = generated[f"{name}.lora_A.default.weight"]
            b = generated[f"{name}.lora_B.default.weight"]
            assert a.shape == (2, 16) and b.shape == (16, 2)
            layer = plain.get_submodule(name)
            layer.weight += exp.peft.alpha / exp.peft.rank * b @ a
        head = dict(client.model.target.named_parameters())
        plain.head.weight.copy_(head["head.weight"])
        plain.head.bias.copy_(head["head.bias"])
    x = torch.from_numpy(data.client(0).test.x[:4])
    client.model.eval(), plain.eval()
    torch.testing.assert_close(client.model(x), plain(x), rtol=1e-5, atol=1e-5)


def test_lpm_trains_only_the_hypernetwork_embedding_and_head() -> None:
    from fedsim.clients.hyperfl import LpmClient

    exp = load_experiment(None, [*LPM, "train.epochs=1"])
    data = federated_data(exp.data, exp.federation.clients, exp.seed)
    client = LpmClient(exp, data.info, torch.device("cpu"))
    frozen = {
        k: v.clone()
        for k, v in client.model.target.state_dict().items()
        if "lora_" not in k and not k.startswith("head.")
    }
    net = initial_hypernetwork(
        client.model.hypernetwork.shapes, exp.strategy.options, exp.seed
    )
    hyper = ArrayRecord({k: v.detach() for k, v in net.state_dict().items()})
    state = RecordDict()
    up = client.train(content(hyper, 1), data.client(0), server_round=1, state=state)
    assert set(up[ARRAYS]) == set(hyper)
    assert set(state[PRIVATE]) == {EMBEDDING, "head.weight", "head.bias"}
    for k, v in client.model.target.state_dict().items():
        if k in frozen:
            assert torch.equal(v, frozen[k]), k
    with pytest.raises(ConfigError, match="peft.ranks"):
        from fedsim.learn.base import build_model
        from fedsim.learn.hypernet import check_lpm

        bad = load_experiment(None, [*LPM, "peft.ranks=[2, 4]"])
        check_lpm(bad, build_model(bad.model, data.info, bad.seed), data)
