"""FLoRA: stacking is the exact weighted sum of the clients' B A, and a server round
gives the model that carries the stacked adapter."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from peft import LoraConfig, get_peft_model
from torch import nn

from fedsim.clients.lora import LoraClient
from fedsim.core.loading import load_experiment
from fedsim.core.messages import ARRAYS, METRICS, NUM_EXAMPLES
from fedsim.learn.base import build_model
from fedsim.learn.data import federated_data
from fedsim.learn.lora import LORA_A, LORA_B
from fedsim.strategies.flora import (
    AGGREGATION_ERROR,
    aggregation_error,
    exact_update,
    stack_lora,
)
from fedsim.strategies.flora.server import FLoRA
from tests.conftest import strategy_for

MODULES = ("base_model.model.blocks.0.q_proj", "base_model.model.blocks.0.v_proj")


def peft_name(module: str, factor: str) -> str:
    return f"{module}.{factor}.default.weight"


def random_adapters(
    ranks: list[int], d_in: int = 7, d_out: int = 6, seed: int = 0
) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    adapters = []
    for r in ranks:
        adapter = {}
        for module in MODULES:
            adapter[peft_name(module, LORA_A)] = rng.normal(size=(r, d_in))
            adapter[peft_name(module, LORA_B)] = rng.normal(size=(d_out, r))
        adapter["base_model.model.head.weight"] = rng.normal(size=(3, d_in))
        adapters.append(adapter)
    return adapters


def oracle(adapters, weights, scalings) -> dict[str, np.ndarray]:
    """sum_k p_k s_k B_k A_k with an explicit loop."""
    total = float(sum(weights))
    out = {}
    for module in MODULES:
        acc = np.zeros((6, 7))
        for adapter, w, s in zip(adapters, weights, scalings):
            b = adapter[peft_name(module, LORA_B)]
            a = adapter[peft_name(module, LORA_A)]
            acc += (w / total) * s * (b @ a)
        out[module] = acc
    return out


def rel(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.linalg.norm(x - y) / np.linalg.norm(y))


@pytest.mark.parametrize(
    ("ranks", "weights", "scalings"),
    [
        ([5, 3, 1], [3.0, 1.0, 6.0], [2.0, 16 / 3, 4.0]),  # heterogeneous ranks
        ([4, 4], [120, 7], None),  # unnormalised integer weights, default scaling
        ([2], [7.0], [8.0]),  # one client
        ([8, 2, 2, 1], [1, 1, 1, 1], [0.5, 1.0, 2.0, 3.0]),  # different scalings
    ],
)
def test_stack_lora_equals_weighted_sum(ranks, weights, scalings) -> None:
    adapters = random_adapters(ranks)
    stacked = stack_lora(adapters, weights, scalings)
    s = scalings or [1.0] * len(ranks)
    expected = oracle(adapters, weights, s)
    assert set(stacked) == {peft_name(m, f) for m in MODULES for f in (LORA_A, LORA_B)}
    for module in MODULES:
        a = stacked[peft_name(module, LORA_A)]
        b = stacked[peft_name(module, LORA_B)]
        assert a.shape == (sum(ranks), 7) and b.shape == (6, sum(ranks))
        assert rel(b @ a, expected[module]) < 1e-6
    exact = exact_update(adapters, weights, scalings)
    for module in MODULES:
        assert rel(exact[module], expected[module]) < 1e-12


def test_one_client_stack_is_its_scaled_adapter() -> None:
    (adapter,) = random_adapters([3])
    stacked = stack_lora([adapter], [5.0], [2.0])
    key_a, key_b = peft_name(MODULES[0], LORA_A), peft_name(MODULES[0], LORA_B)
    np.testing.assert_allclose(stacked[key_a], 2.0 * adapter[key_a])
    np.testing.assert_array_equal(stacked[key_b], adapter[key_b])


def test_stack_lora_matches_peft_cat_combination() -> None:
    """PEFT's add_weighted_adapter(combination_type="cat") is FLoRA's stacking."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("q_proj", nn.Linear(7, 6))
    model.add_module("v_proj", nn.Linear(7, 6))
    ranks, alphas, weights = [4, 2, 1], [16.0, 8.0, 3.0], [0.5, 0.2, 0.3]
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=ranks[0], lora_alpha=alphas[0], target_modules=["q_proj", "v_proj"]
        ),
        adapter_name="c0",
    )
    for k in (1, 2):
        peft_model.add_adapter(
            f"c{k}",
            LoraConfig(
                r=ranks[k], lora_alpha=alphas[k], target_modules=["q_proj", "v_proj"]
            ),
        )
    adapters: list[dict[str, np.ndarray]] = [{} for _ in ranks]
    with torch.no_grad():
        for name in ("q_proj", "v_proj"):
            layer = peft_model.base_model.model.get_submodule(name)
            for k in range(3):
                layer.lora_B[f"c{k}"].weight.normal_()
                adapters[k][f"{name}.lora_A.weight"] = (
                    layer.lora_A[f"c{k}"].weight.numpy().copy()
                )
                adapters[k][f"{name}.lora_B.weight"] = (
                    layer.lora_B[f"c{k}"].weight.numpy().copy()
                )
    peft_model.add_weighted_adapter(
        ["c0", "c1", "c2"], weights, adapter_name="cat", combination_type="cat"
    )
    scalings = [a / r for a, r in zip(alphas, ranks)]
    stacked = stack_lora(adapters, weights, scalings)
    for name in ("q_proj", "v_proj"):
        layer = peft_model.base_model.model.get_submodule(name)
        assert layer.scaling["cat"] == 1.0
        np.testing.assert_allclose(
            stacked[f"{name}.lora_A.weight"],
            layer.lora_A["cat"].weight.numpy(),
            rtol=1e-6,
        )
        np.testing.assert_allclose(
            stacked[f"{name}.lora_B.weight"],
            layer.lora_B["cat"].weight.numpy(),
            rtol=1e-6,
        )


def test_stack_lora_pairs_by_name_and_rejects_bad_input() -> None:
    adapters = random_adapters([2, 2])
    # Square factors (r == d_in == d_out) cannot confuse a name-based pairing.
    square = [
        {
            peft_name(MODULES[0], LORA_A): np.eye(3),
            peft_name(MODULES[0], LORA_B): 2 * np.eye(3),
        }
    ]
    stacked = stack_lora(square, [1.0])
    np.testing.assert_array_equal(stacked[peft_name(MODULES[0], LORA_B)], 2 * np.eye(3))
    with pytest.raises(ValueError, match="weights"):
        stack_lora(adapters, [1.0, -1.0])
    with pytest.raises(ValueError, match="zero"):
        stack_lora(adapters, [0, 0])
    with pytest.raises(ValueError, match="expected 2 weights"):
        stack_lora(adapters, [1.0])
    broken = dict(adapters[1])
    del broken[peft_name(MODULES[1], LORA_B)]
    with pytest.raises(ValueError, match="no matching"):
        stack_lora([adapters[0], broken], [1, 1])
    wide = dict(adapters[1])
    wide[peft_name(MODULES[0], LORA_A)] = np.ones((2, 9))
    with pytest.raises(ValueError, match="d_in x d_out"):
        stack_lora([adapters[0], wide], [1, 1])


def test_aggregation_error_is_relative_frobenius_over_modules() -> None:
    exact = {"a": np.array([[3.0, 0.0]]), "b": np.array([[0.0, 4.0]])}
    applied = {"a": np.array([[3.0, 1.0]]), "b": np.array([[0.0, 4.0]])}
    assert aggregation_error(applied, exact) == pytest.approx(1 / 5)
    assert aggregation_error(exact, exact) == 0.0


# -- one server round -------------------------------------------------------------


class FakeGrid:
    """What FedAvg's sampling asks of a Grid."""

    def __init__(self, nodes: list[int]):
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Flower's runtime sets the task identity that new Messages carry."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 0)
    yield


SMALL_VIT = (
    "model.name=vit",
    "model.hidden=16",
    "model.depth=1",
    "model.heads=2",
    "federation.clients=3",
    "strategy.name=flora",
    "peft.method=lora",
    "peft.ranks=[4, 2, 1]",
    "peft.targets=['q_proj', 'v_proj', 'out_proj']",
    "train.optimizer=adam",
    "train.lr=0.01",
)


def test_flora_round_gives_the_model_carrying_the_stacked_adapter(
    task_identity,
) -> None:
    exp = load_experiment(None, SMALL_VIT)
    data = federated_data(exp.data, exp.federation.clients, exp.seed)
    base = build_model(exp.model, data.info, exp.seed)
    initial = {k: v.detach().clone() for k, v in base.state_dict().items()}

    strategy = strategy_for(exp)
    assert isinstance(strategy, FLoRA)
    messages = list(
        strategy.configure_train(
            1, ArrayRecord(initial), ConfigRecord(), FakeGrid([11, 12, 13])
        )
    )
    assert len(messages) == 3
    sent = messages[0].content[ARRAYS]
    assert set(sent) == {
        *(f"blocks.0.attn.{m}.weight" for m in ("q_proj", "v_proj", "out_proj")),
        "head.weight",
        "head.bias",
    }
    client = LoraClient(exp, data.info, torch.device("cpu"))
    replies = []
    for pid, msg in enumerate(messages):
        content = client.train(
            msg.content, data.client(pid), server_round=1, state=RecordDict()
        )
        replies.append(Message(content, reply_to=msg))
    arrays, metrics = strategy.aggregate_train(1, replies)
    again, _ = strategy.aggregate_train(1, replies[::-1])  # arrival order is moot
    assert all(np.array_equal(arrays[k].numpy(), again[k].numpy()) for k in arrays)
    assert metrics is not None and metrics[AGGREGATION_ERROR] < 1e-12
    merged_state = arrays.to_torch_state_dict()
    assert set(merged_state) == set(initial)
    for key in initial:
        if key not in sent:  # the frozen base is untouched
            assert torch.equal(merged_state[key], initial[key])

    # Oracle: the initial base carrying every client's adapter, combined by PEFT's
    # "cat" (stacking), with the head averaged by examples.
    uploads = [r.content[ARRAYS].to_torch_state_dict() for r in replies]
    examples = [float(r.content[METRICS][NUM_EXAMPLES]) for r in replies]
    p = [e / sum(examples) for e in examples]
    oracle_model = copy.deepcopy(base)
    targets = [f"blocks.0.attn.{m}" for m in ("q_proj", "v_proj", "out_proj")]
    peft_model = None
    for k, (rank, upload) in enumerate(zip((4, 2, 1), uploads)):
        config = LoraConfig(r=rank, lora_alpha=exp.peft.alpha, target_modules=targets)
        if peft_model is None:
            peft_model = get_peft_model(oracle_model, config, adapter_name="c0")
        else:
            peft_model.add_adapter(f"c{k}", config)
        with torch.no_grad():
            for t in targets:
                layer = oracle_model.get_submodule(t)
                layer.lora_A[f"c{k}"].weight.copy_(upload[f"{t}.lora_A.weight"])
                layer.lora_B[f"c{k}"].weight.copy_(upload[f"{t}.lora_B.weight"])
    peft_model.add_weighted_adapter(
        ["c0", "c1", "c2"], p, "stacked", combination_type="cat"
    )
    peft_model.set_adapter("stacked")
    with torch.no_grad():
        for key in ("head.weight", "head.bias"):
            oracle_model.get_parameter(key).copy_(
                sum(pk * u[key] for pk, u in zip(p, uploads))
            )
    server_model = build_model(exp.model, data.info, exp.seed)
    server_model.load_state_dict(merged_state)
    x = torch.from_numpy(data.test.x[:64])
    peft_model.eval()
    server_model.eval()
    with torch.no_grad():
        expected = peft_model(x)
        got = server_model(x)
        before = base(x)
    assert not torch.allclose(got, before, atol=1e-3)  # the round changed the model
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
