"""The LoRA client: ranks per client, what it trains and sends, a resident base that
always matches the global model, PEFT on a transformers model, and the cached
pre-trained base."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedsim.clients.lora import LoraClient
from fedsim.core.errors import ConfigError
from fedsim.core.experiment import PeftConfig
from fedsim.core.loading import load_experiment
from fedsim.core.messages import (
    ARRAYS,
    CONFIG,
    LORA_RANK,
    LORA_SCALING,
    METRICS,
    SERVER_ROUND,
)
from fedsim.learn import pretrain
from fedsim.learn.base import build_model
from fedsim.learn.data import federated_data
from fedsim.learn.lora import (
    alpha_for,
    inject_lora,
    lora_layout,
    rank_for,
    scaling_for,
)
from fedsim.strategies.flora.server import FLoRA

VIT = (
    "model.name=vit",
    "model.hidden=16",
    "model.depth=1",
    "model.heads=2",
    "federation.clients=3",
    "strategy.name=flora",
    "peft.method=lora",
    "peft.ranks=[4, 2]",
    "train.optimizer=adam",
    "train.lr=0.01",
)
ATTN = [f"blocks.0.attn.{m}" for m in ("q_proj", "k_proj", "v_proj", "out_proj")]


def content_for(arrays: ArrayRecord, server_round: int) -> RecordDict:
    return RecordDict(
        {ARRAYS: arrays, CONFIG: ConfigRecord({SERVER_ROUND: server_round})}
    )


def test_rank_assignment_cycles_through_ranks() -> None:
    hetero = PeftConfig(method="lora", ranks=(16, 8, 4))
    assert [rank_for(hetero, i) for i in range(7)] == [16, 8, 4, 16, 8, 4, 16]
    assert [rank_for(PeftConfig(method="lora", rank=5), i) for i in range(3)] == [
        5,
        5,
        5,
    ]


def test_client_trains_adapters_and_head_only_and_keeps_its_base() -> None:
    exp = load_experiment(None, VIT)
    data = federated_data(exp.data, exp.federation.clients, exp.seed)
    client = LoraClient(exp, data.info, torch.device("cpu"))
    assert client.layout.adapted == tuple(ATTN)
    assert client.layout.trained == ("head.weight", "head.bias")
    strategy = FLoRA.from_layout(client.layout)
    initial = {k: v.clone() for k, v in client.base.state_dict().items()}
    down = strategy.down_arrays(ArrayRecord(initial))
    reply = client.train(
        content_for(down, 1), data.client(1), server_round=1, state=RecordDict()
    )

    arrays = reply[ARRAYS].to_torch_state_dict()
    expected = {f"{m}.lora_{f}.weight" for m in ATTN for f in "AB"} | {
        "head.weight",
        "head.bias",
    }
    assert set(arrays) == expected
    for m in ATTN:  # partition 1 trains rank ranks[1 % 2] = 2
        assert arrays[f"{m}.lora_A.weight"].shape == (2, 16)
        assert arrays[f"{m}.lora_B.weight"].shape == (16, 2)
        assert arrays[f"{m}.lora_B.weight"].abs().sum() > 0  # B left zero: it trained
    assert not torch.equal(arrays["head.weight"], initial["head.weight"])
    metrics = reply[METRICS]
    assert metrics[LORA_RANK] == 2 and metrics[LORA_SCALING] == pytest.approx(16.0 / 2)
    # The resident base is back to what it received: no adapters, nothing changed.
    state = client.base.state_dict()
    assert set(state) == set(initial)
    assert all(torch.equal(state[k], initial[k]) for k in initial)
    assert not any(p.requires_grad for p in client.base.parameters())


def test_clients_of_a_round_share_the_initial_a() -> None:
    exp = load_experiment(None, VIT)
    data = federated_data(exp.data, exp.federation.clients, exp.seed)
    high = build_model(exp.model, data.info, exp.seed)
    low = build_model(exp.model, data.info, exp.seed)
    layout = lora_layout(high, exp.peft)
    inject_lora(high, exp.peft, layout, rank=4, init_seed=7)
    inject_lora(low, exp.peft, layout, rank=2, init_seed=7)
    for m in ATTN:
        a_high = high.get_submodule(m).lora_A["default"].weight
        a_low = low.get_submodule(m).lora_A["default"].weight
        torch.testing.assert_close(a_low, a_high[:2], rtol=0, atol=0)
        assert high.get_submodule(m).lora_B["default"].weight.abs().sum() == 0
    other = build_model(exp.model, data.info, exp.seed)
    inject_lora(other, exp.peft, layout, rank=2, init_seed=8)  # next round: new A
    assert not torch.equal(
        other.get_submodule(ATTN[0]).lora_A["default"].weight,
        low.get_submodule(ATTN[0]).lora_A["default"].weight,
    )


def test_a_client_that_missed_rounds_starts_from_the_current_global_model() -> None:
    exp = load_experiment(None, VIT)
    data = federated_data(exp.data, exp.federation.clients, exp.seed)
    client = LoraClient(exp, data.info, torch.device("cpu"))
    strategy = FLoRA.from_layout(client.layout)
    initial = {k: v.clone() for k, v in client.base.state_dict().items()}
    client.train(
        content_for(strategy.down_arrays(ArrayRecord(initial)), 1),
        data.client(0),
        server_round=1,
        state=RecordDict(),
    )
    # Two rounds later the server's model differs in every weight rounds change.
    generator = torch.Generator().manual_seed(0)
    current = {
        k: v + torch.randn(v.shape, generator=generator)
        if k in strategy.changing
        else v
        for k, v in initial.items()
    }
    client.load(content_for(strategy.down_arrays(ArrayRecord(current)), 3))
    state = client.base.state_dict()
    assert all(torch.equal(state[k], current[k]) for k in current)


def test_lora_on_a_tiny_transformers_bert() -> None:
    exp = load_experiment(
        None,
        (
            "model.name=tiny-bert",
            "model.hidden=16",
            "model.depth=1",
            "model.heads=2",
            "federation.clients=3",
            "strategy.name=flora",
            "peft.method=lora",
            "peft.rank=4",
            "peft.targets=['query', 'value']",
            "train.optimizer=adam",
            "train.lr=0.01",
        ),
    )
    data = federated_data(exp.data, exp.federation.clients, exp.seed)
    client = LoraClient(exp, data.info, torch.device("cpu"))
    query = "encoder.encoder.layer.0.attention.self.query"
    assert client.layout.adapted == (
        query,
        "encoder.encoder.layer.0.attention.self.value",
    )
    strategy = FLoRA.from_layout(client.layout)
    initial = ArrayRecord({k: v.clone() for k, v in client.base.state_dict().items()})
    contents = [
        client.train(
            content_for(strategy.down_arrays(initial), 1),
            data.client(pid),
            server_round=1,
            state=RecordDict(),
        )
        for pid in range(2)
    ]
    assert tuple(contents[0][ARRAYS][f"{query}.lora_A.weight"].shape) == (4, 16)
    merged, error = strategy.merge(initial, contents)
    assert error < 1e-12
    delta = merged[f"{query}.weight"].numpy() - initial[f"{query}.weight"].numpy()
    assert np.abs(delta).max() > 0
    np.testing.assert_array_equal(  # keys no round changes stay the base's
        merged[f"{query}.bias"].numpy(), initial[f"{query}.bias"].numpy()
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("peft.targets=['qkv']",), "peft.targets: 'qkv' matches no module"),
        (("peft.targets=['norm1']",), "peft.targets: 'blocks.0.norm1' is a LayerNorm"),
        (("peft.modules-to-save=['nothing']",), "peft.modules-to-save: 'nothing'"),
        (("peft.modules-to-save=['attn']",), "contains the LoRA target"),
    ],
)
def test_bad_targets_are_config_errors(
    overrides: tuple[str, ...], message: str
) -> None:
    exp = load_experiment(None, VIT + overrides)
    data = federated_data(exp.data, exp.federation.clients, exp.seed)
    with pytest.raises(ConfigError, match=message):
        LoraClient(exp, data.info, torch.device("cpu"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ("strategy.name=flora",),
            "peft.method: 'none' cannot run strategy.name = 'flora'",
        ),
        (("strategy.name=fedit",), "set peft.method = 'lora'"),
        (
            ("peft.method=lora",),
            "peft.method: 'lora' cannot run strategy.name = 'fedavg'",
        ),
        (
            ("peft.method=lora", "strategy.name=fedit", "peft.targets=[]"),
            "peft.targets",
        ),
        (("peft.method=qlora",), "peft.method: 'qlora' is not allowed"),
        (("model.pretrain=digits", "data.test-fraction=0.3"), "data.test-fraction"),
        (("model.pretrain=mnist",), "model.pretrain: 'mnist' is not allowed"),
    ],
)
def test_inconsistent_peft_settings_are_rejected(
    overrides: tuple[str, ...], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_experiment(None, overrides)


def test_pretrained_base_is_built_once_and_never_sees_the_test_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDSIM_CACHE", str(tmp_path))
    exp = load_experiment(
        None,
        (
            "model.name=mlp",
            "model.hidden=16",
            "model.pretrain=digits",
            "model.pretrain-classes=[0, 1, 2]",
            "model.pretrain-epochs=10",
        ),
    )
    data = federated_data(exp.data, exp.federation.clients, exp.seed)
    public = pretrain.public_split(exp.model, data.info, exp.seed)
    expected = data.pool.subset(np.flatnonzero(data.pool.y < 3))
    np.testing.assert_array_equal(public.x, expected.x)  # the pool: no test image
    np.testing.assert_array_equal(public.y, expected.y)

    calls = []
    real = pretrain.pretrain
    monkeypatch.setattr(pretrain, "pretrain", lambda *a: calls.append(a) or real(*a))
    first = build_model(exp.model, data.info, exp.seed)
    second = build_model(exp.model, data.info, exp.seed)
    assert (
        len(calls) == 1 and pretrain.cache_path(exp.model, data.info, exp.seed).exists()
    )
    for (k, v), w in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(v, w), k
    scratch = build_model(
        exp.model.__class__(name="mlp", hidden=16), data.info, exp.seed
    )
    assert not torch.equal(
        first.state_dict()["head.weight"], scratch.state_dict()["head.weight"]
    )
    # The base learned the public classes.
    x = torch.from_numpy(public.x)
    with torch.no_grad():
        accuracy = (first(x).argmax(1).numpy() == public.y).mean()
    assert accuracy > 0.9

    with pytest.raises(ConfigError, match="model.pretrain-classes: 12"):
        pretrain.public_split(
            exp.model.__class__(name="mlp", pretrain="digits", pretrain_classes=(12,)),
            data.info,
            exp.seed,
        )


def test_a_penalty_hook_reaches_the_lora_clients_training() -> None:
    """A LoRA client whose ``penalty`` is ``sum <p, 1>`` over the trainable
    parameters moves each of them by ``-lr`` more in its one SGD step."""
    lr = 0.01
    exp = load_experiment(
        None,
        [
            *VIT,
            "train.optimizer=sgd",
            "train.momentum=0",
            f"train.lr={lr}",
            "train.epochs=1",
            "train.batch-size=1024",
        ],
    )
    data = federated_data(exp.data, exp.federation.clients, exp.seed)

    class Shifted(LoraClient):
        def penalty(self, model, content, state):  # type: ignore[no-untyped-def]
            params = [p for p in model.parameters() if p.requires_grad]
            return lambda: sum(p.sum() for p in params)

    replies = []
    for cls in (LoraClient, Shifted):
        client = cls(exp, data.info, torch.device("cpu"))
        down = FLoRA.from_layout(client.layout).down_arrays(
            ArrayRecord(client.base.state_dict())
        )
        reply = client.train(
            content_for(down, 1), data.client(1), server_round=1, state=RecordDict()
        )
        replies.append(reply[ARRAYS].to_torch_state_dict())
    plain, shifted = replies
    assert {k for k in plain if "lora_" in k} and set(plain) == set(shifted)
    for k in plain:
        torch.testing.assert_close(shifted[k], plain[k] - lr, rtol=0, atol=1e-6)
def test_alpha_per_rank_sets_peft_lora_alpha_to_k_r() -> None:
    exp = load_experiment(None, [*VIT, "peft.alpha-per-rank=2"])
    data = federated_data(exp.data, exp.federation.clients, exp.seed)
    for rank in (4, 1):
        assert alpha_for(exp.peft, rank) == 2.0 * rank
        assert scaling_for(exp.peft, rank) == 2.0
        model = build_model(exp.model, data.info, exp.seed)
        wrapped = inject_lora(
            model, exp.peft, lora_layout(model, exp.peft), rank=rank, init_seed=0
        )
        assert wrapped.peft_config["default"].lora_alpha == 2.0 * rank
        assert model.get_submodule(ATTN[0]).scaling["default"] == 2.0
    plain = load_experiment(None, VIT)
    assert scaling_for(plain.peft, 4) == plain.peft.alpha / 4


def test_flora_merge_respects_each_clients_own_scaling() -> None:
    """Ranks 4 and 2 with one ``alpha``: scalings 4 and 8. The merged update is
    the example-weighted sum of PEFT's own delta weights of the clients (each
    at its own scaling)."""
    from peft.tuners.lora import LoraLayer

    exp = load_experiment(None, [*VIT, "train.epochs=1", "train.batch-size=64"])
    data = federated_data(exp.data, exp.federation.clients, exp.seed)
    client = LoraClient(exp, data.info, torch.device("cpu"))
    strategy = FLoRA.from_layout(client.layout)
    initial = {k: v.clone() for k, v in client.base.state_dict().items()}
    content = content_for(strategy.down_arrays(ArrayRecord(initial)), 1)
    replies, deltas = [], []
    for pid in (0, 1):
        reply = client.train(
            content, data.client(pid), server_round=1, state=RecordDict()
        )
        rank = rank_for(exp.peft, pid)
        assert reply[METRICS][LORA_SCALING] == pytest.approx(exp.peft.alpha / rank)
        # PEFT's delta weight of this client's factors, at its own lora_alpha.
        up = reply[ARRAYS].to_torch_state_dict()
        model = inject_lora(
            client.base, exp.peft, client.layout, rank=rank, init_seed=0
        )
        delta = {}
        with torch.no_grad():
            for m in ATTN:
                layer = client.base.get_submodule(m)
                assert isinstance(layer, LoraLayer)
                layer.lora_A["default"].weight.copy_(up[f"{m}.lora_A.weight"])
                layer.lora_B["default"].weight.copy_(up[f"{m}.lora_B.weight"])
                delta[m] = layer.get_delta_weight("default").double().numpy()
        model.unload()
        replies.append(reply)
        deltas.append(delta)
    examples = [float(r[METRICS]["num-examples"]) for r in replies]
    p = [e / sum(examples) for e in examples]
    merged, error = strategy.merge(ArrayRecord(initial), replies)
    assert error < 1e-12
    for m in ATTN:
        want = initial[f"{m}.weight"].double().numpy() + sum(
            pk * d[m] for pk, d in zip(p, deltas)
        )
        np.testing.assert_allclose(
            merged[f"{m}.weight"].numpy(), want, rtol=1e-5, atol=1e-6
        )
