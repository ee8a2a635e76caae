"""HeteroFL and the capacity setting, against independent oracles."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from torch import nn

from fedsim.clients.heterofl import HeteroFLClient
from fedsim.core.capacity import capacity_of
from fedsim.core.errors import ConfigError
from fedsim.core.loading import load_experiment
from fedsim.core.messages import ARRAYS, CONFIG, NUM_EXAMPLES, SERVER_ROUND
from fedsim.learn.capacity import (
    LABEL_SPLIT,
    WidthHooks,
    check_sliceable,
    slice_arrays,
    sub_model,
    training_memory_bytes,
    width_plan,
)
from fedsim.learn.data import Arrays, ClientData, DatasetInfo
from fedsim.learn.models import CNN, MLP, ViT
from fedsim.strategies.heterofl.maths import aggregate_nested
from fedsim.strategies.heterofl.server import HeteroFL, plans, width_metrics
from tests.conftest import ScriptedGrid, reply


def test_averaging_is_the_per_entry_mean_over_the_holders() -> None:
    glob = {
        "w": np.arange(12, dtype=np.float32).reshape(4, 3),
        "b": np.full(4, -1.0, dtype=np.float32),
    }
    uploads = [
        {"w": np.full((4, 3), 10.0, np.float32), "b": np.full(4, 1.0, np.float32)},
        {"w": np.full((2, 2), 20.0, np.float32), "b": np.full(2, 5.0, np.float32)},
        {"w": np.full((1, 1), 60.0, np.float32)},  # holds no bias
    ]
    got = aggregate_nested(glob, uploads)
    for key, g in glob.items():
        want = g.astype(np.float64).copy()
        for index in np.ndindex(g.shape):
            holders = [
                up[key][index]
                for up in uploads
                if key in up and all(i < s for i, s in zip(index, up[key].shape))
            ]
            if holders:
                want[index] = np.mean(holders)
        np.testing.assert_allclose(got[key], want)
        assert got[key].dtype == g.dtype
    assert got["w"][0, 0] == 30.0 and got["w"][3, 2] == 10.0 and got["b"][0] == 3.0

    untouched = aggregate_nested(glob, [{"w": np.zeros((1, 1), np.float32)}])
    np.testing.assert_array_equal(untouched["w"].ravel()[1:], glob["w"].ravel()[1:])
    with pytest.raises(ValueError, match="not a leading block"):
        aggregate_nested(glob, [{"w": np.zeros((5, 3), np.float32)}])


def zeroed_outside(model: nn.Module, ratio: float) -> nn.Module:
    """The full model with every weight outside the width's blocks set to 0."""
    plan = width_plan(model, ratio)
    with torch.no_grad():
        for name, p in model.named_parameters():
            mask = torch.zeros_like(p, dtype=torch.bool)
            mask[tuple(slice(0, s) for s in plan[name])] = True
            p.masked_fill_(~mask, 0.0)
    return model


@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.3, 0.25])
@pytest.mark.parametrize(
    "build",
    [lambda: MLP(64, 10, 5, 0.0), lambda: CNN((1, 8, 8), 10, 5, 0.0)],
    ids=["mlp", "cnn"],
)
def test_a_sub_model_is_the_full_model_with_the_missing_units_zeroed(
    build, ratio
) -> None:
    torch.manual_seed(0)
    full = build().double()
    sub = sub_model(full, ratio)
    x = torch.rand(6, 1, 8, 8, dtype=torch.float64)
    want = zeroed_outside(full, ratio)(x)
    torch.testing.assert_close(sub(x), want, rtol=1e-12, atol=1e-12)
    units = math.ceil(ratio * 10)
    head = sub.get_submodule("head")
    assert isinstance(head, nn.Linear)
    assert (head.in_features, head.out_features) == (units, 5)


def test_cnn_plan_keeps_leading_channels_and_their_flattened_features() -> None:
    plan = width_plan(CNN((1, 8, 8), 10, 5, 0.0), 0.5)
    assert plan["features.0.weight"] == (8, 1, 3, 3)
    assert plan["features.2.weight"] == (16, 8, 3, 3)
    assert plan["fc.0.weight"] == (5, 16 * 4 * 4)
    assert plan["head.weight"] == (5, 5) and plan["head.bias"] == (5,)
    with pytest.raises(ConfigError, match="model.name"):
        width_plan(
            ViT((1, 8, 8), 5, dim=8, depth=1, heads=2, patch_size=4, dropout=0.0), 0.5
        )


def test_capacity_entries_cycle_and_bad_values_are_config_errors() -> None:
    assert [capacity_of((1.0, 0.5, 0.25), i) for i in range(5)] == [
        1.0,
        0.5,
        0.25,
        1.0,
        0.5,
    ]
    for bad in ("[0.0]", "[1.5]", "[]"):
        with pytest.raises(ConfigError, match="strategy.capacities"):
            load_experiment(
                None, ["strategy.name=heterofl", f"strategy.capacities={bad}"]
            )


def test_memory_accounting_counts_parameters_gradients_momentum_activations() -> None:
    d, h, c, batch = 64, 10, 5, 32
    model = MLP(d, h, c, 0.0)
    params = d * h + h + h * h + h + h * c + c
    # input, Flatten, Linear, ReLU, Dropout, Linear, ReLU, head: per example
    activations = d + d + h + h + h + h + h + c
    want = 4 * (3 * params + batch * activations)
    assert training_memory_bytes(model, (1, 8, 8), batch, optimizer_slots=1) == want
    sub = sub_model(model, 0.5)
    assert training_memory_bytes(sub, (1, 8, 8), batch) < want


def message_content(arrays: dict[str, np.ndarray]) -> RecordDict:
    record = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    return RecordDict({ARRAYS: record, CONFIG: ConfigRecord({SERVER_ROUND: 1})})


class SlicingGrid(ScriptedGrid):
    """Train replies: the received slice plus the partition id + 1."""

    def respond(self, msg, message_id, node, pid):  # type: ignore[no-untyped-def]
        up = {k: a.numpy() + pid + 1 for k, a in msg.content[ARRAYS].items()}
        return reply(up, {NUM_EXAMPLES: 1 + pid}, src=node, reply_to=message_id)


def test_each_node_gets_its_slice_and_the_round_averages_over_holders(
    task_identity: None,
) -> None:
    torch.manual_seed(0)
    model = MLP(64, 8, 5, 0.0)
    capacities = (1.0, 0.5, 0.25)
    plan_of = plans(model, capacities)
    strategy = HeteroFL(plan_of, mask=False, min_available_nodes=3)
    glob = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    arrays = message_content(glob)[ARRAYS]
    grid = SlicingGrid({21: 0, 22: 1, 23: 2})
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), grid))
    assert len(messages) == 3
    replies = []
    for i, msg in enumerate(messages):
        pid = grid.partitions[msg.metadata.dst_node_id]
        shapes = {k: tuple(a.shape) for k, a in msg.content[ARRAYS].items()}
        assert shapes == width_plan(model, capacity_of(capacities, pid))
        replies.append(grid.answer(msg, f"m{i}"))
    new, metrics = strategy.aggregate_train(1, replies)
    assert new is not None and metrics is not None
    uploads = [slice_arrays(glob, plan_of(p)) for p in range(3)]
    uploads = [{k: v + p + 1 for k, v in up.items()} for p, up in enumerate(uploads)]
    want = aggregate_nested(glob, uploads)
    for key in glob:
        np.testing.assert_allclose(new[key].numpy(), want[key], rtol=1e-6)
    # hidden unit 0 is held by all three clients (+1, +2, +3), unit 7 by one
    np.testing.assert_allclose(
        new["body.1.bias"].numpy()[0], glob["body.1.bias"][0] + 2
    )
    np.testing.assert_allclose(
        new["body.1.bias"].numpy()[7], glob["body.1.bias"][7] + 1
    )


#: Digits-shaped data without loading digits (fast).
INFO = DatasetInfo((1, 8, 8), 10)


def fake_client(partition_id: int, n: int = 48) -> ClientData:
    rng = np.random.default_rng(partition_id)

    def split() -> Arrays:
        x = rng.random((n, 1, 8, 8), dtype=np.float32)
        return Arrays(x, rng.integers(0, 10, n).astype(np.int64))

    return ClientData(partition_id, split(), split())


def test_the_client_trains_its_slice_and_reports_its_cost() -> None:
    exp = load_experiment(
        None,
        [
            "strategy.name=heterofl",
            "federation.clients=3",
            "model.name=mlp",
            "model.hidden=8",
            "robust.epsilon=0.1",
            "robust.steps=2",
        ],
    )
    client = HeteroFLClient(exp, INFO, torch.device("cpu"))
    check_sliceable(exp, client.full, None)
    glob = {k: v.detach().numpy() for k, v in client.full.state_dict().items()}
    plan = width_plan(client.full, 0.25)  # partition 2
    content = message_content(slice_arrays(glob, plan))
    out = client.train(content, fake_client(2), server_round=1, state=RecordDict())
    trained = out[ARRAYS]
    assert {k: tuple(a.shape) for k, a in trained.items()} == plan
    assert any(
        not np.array_equal(trained[k].numpy(), slice_arrays(glob, plan)[k])
        for k in plan
    )
    metrics = out["metrics"]
    assert metrics["width"] == 0.25
    assert metrics["params"] == sum(math.prod(s) for s in plan.values())
    evaluated = client.evaluate(
        content, fake_client(2), server_round=1, state=RecordDict()
    )["metrics"]
    assert 0.0 <= evaluated["robust-accuracy"] <= evaluated["accuracy"] + 1e-9


def test_scaler_and_mask_are_the_reference_maths() -> None:
    """The reference's ``Scaler`` (hidden outputs / rate while training) and
    ``masked_fill(label_mask == 0, 0)`` of the logits, by hand in numpy."""
    torch.manual_seed(0)
    sub = sub_model(MLP(64, 8, 5, 0.0), 0.5).double()
    hooks = WidthHooks(sub, 0.5, scaler=True, mask=True)
    hooks.labels = [1, 3]
    w = {k: v.detach().numpy() for k, v in sub.state_dict().items()}
    x = torch.rand(6, 1, 8, 8, dtype=torch.float64)

    def oracle(rate: float) -> np.ndarray:
        h = x.numpy().reshape(6, -1)
        for layer in ("body.1", "body.4"):
            h = np.maximum((h @ w[f"{layer}.weight"].T + w[f"{layer}.bias"]) / rate, 0)
        out = h @ w["head.weight"].T + w["head.bias"]
        label_mask = np.zeros(5)
        label_mask[[1, 3]] = 1
        return np.where(label_mask == 0, 0.0, out)

    sub.train()
    np.testing.assert_allclose(sub(x).detach().numpy(), oracle(0.5), rtol=1e-12)
    sub.eval()  # the scaler is the identity in evaluation; the mask stays
    np.testing.assert_allclose(sub(x).detach().numpy(), oracle(1.0), rtol=1e-12)
    hooks.labels = None
    assert bool((sub(x)[:, 0] != 0).all())


def test_label_split_aggregation_is_the_reference_combine() -> None:
    """fed.py ``combine`` for the output layer, as loops: a head row (class)
    sums the uploads whose label split holds it, divided by their count;
    hidden entries as before; rows nobody holds keep their value."""
    rng = np.random.default_rng(0)
    glob = {
        "body.1.weight": rng.normal(size=(4, 3)),
        "head.weight": rng.normal(size=(5, 4)),
        "head.bias": rng.normal(size=5),
    }
    uploads = [
        {
            "body.1.weight": rng.normal(size=(4, 3)),
            "head.weight": rng.normal(size=(5, 4)),
            "head.bias": rng.normal(size=5),
        },
        {
            "body.1.weight": rng.normal(size=(2, 3)),
            "head.weight": rng.normal(size=(5, 2)),
            "head.bias": rng.normal(size=5),
        },
    ]
    splits = [[0, 1, 2], [2, 3]]
    rows = [{"head.weight": s, "head.bias": s} for s in splits]
    got = aggregate_nested(glob, uploads, rows)
    for key, v in glob.items():
        tmp, count = np.zeros_like(v), np.zeros_like(v)
        for up, split in zip(uploads, splits):
            local = up[key]
            if key.startswith("head"):  # rows of the split, columns held
                cols = tuple(slice(0, s) for s in local.shape[1:])
                for c in split:
                    tmp[(c, *cols)] += local[c]
                    count[(c, *cols)] += 1
            else:
                index = tuple(slice(0, s) for s in local.shape)
                tmp[index] += local
                count[index] += 1
        want = v.copy()
        want[count > 0] = tmp[count > 0] / count[count > 0]
        np.testing.assert_allclose(got[key], want, rtol=1e-12)
    # class 4: nobody holds it; class 2: both
    np.testing.assert_array_equal(got["head.bias"][4], glob["head.bias"][4])
    np.testing.assert_allclose(
        got["head.bias"][2],
        (uploads[0]["head.bias"][2] + uploads[1]["head.bias"][2]) / 2,
    )


class LabelGrid(SlicingGrid):
    """Train replies as :class:`SlicingGrid`, with partition p holding class p
    and class 4."""

    def respond(self, msg, message_id, node, pid):  # type: ignore[no-untyped-def]
        out = super().respond(msg, message_id, node, pid)
        out.content[LABEL_SPLIT] = ConfigRecord({LABEL_SPLIT: [pid, 4]})
        return out


def test_a_masked_round_averages_head_rows_over_the_class_holders(
    task_identity: None,
) -> None:
    torch.manual_seed(0)
    model = MLP(64, 8, 5, 0.0)
    plan_of = plans(model, (1.0, 0.5, 0.25))
    strategy = HeteroFL(plan_of, mask=True, min_available_nodes=3)
    glob = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    grid = LabelGrid({21: 0, 22: 1, 23: 2})
    messages = strategy.configure_train(
        1, message_content(glob)[ARRAYS], ConfigRecord(), grid
    )
    replies = [grid.answer(m, f"m{i}") for i, m in enumerate(messages)]
    new, _ = strategy.aggregate_train(1, replies)
    assert new is not None
    bias = new["head.bias"].numpy()
    for pid in range(3):  # class p: only partition p (+ p + 1)
        np.testing.assert_allclose(
            bias[pid], glob["head.bias"][pid] + pid + 1, rtol=1e-6
        )
    np.testing.assert_allclose(bias[3], glob["head.bias"][3])  # nobody
    np.testing.assert_allclose(bias[4], glob["head.bias"][4] + 2, rtol=1e-6)  # all
    # a reply without its label split is refused while masking is on
    one = HeteroFL(plan_of, mask=True, min_available_nodes=1, min_train_nodes=1)
    bare_grid = SlicingGrid({21: 0})
    sent = one.configure_train(2, new, ConfigRecord(), bare_grid)
    bare = [bare_grid.answer(m, f"n{i}") for i, m in enumerate(sent)]
    with pytest.raises(ValueError, match="label-split"):
        one.aggregate_train(2, bare)


def test_the_client_masks_to_its_classes_and_reports_them() -> None:
    exp = load_experiment(
        None,
        [
            "strategy.name=heterofl",
            "federation.clients=3",
            "model.name=mlp",
            "model.hidden=8",
        ],
    )
    client = HeteroFLClient(exp, INFO, torch.device("cpu"))
    glob = {k: v.detach().numpy() for k, v in client.full.state_dict().items()}
    content = message_content(slice_arrays(glob, width_plan(client.full, 0.5)))
    data = fake_client(1)
    data = ClientData(1, Arrays(data.train.x, data.train.y % 4), data.test)
    out = client.train(content, data, server_round=1, state=RecordDict())
    assert list(out[LABEL_SPLIT][LABEL_SPLIT]) == [0, 1, 2, 3]
    model, hooks = client.model_for(1)
    assert hooks.labels == [0, 1, 2, 3]
    logits = model(torch.from_numpy(data.test.x))
    assert bool((logits[:, 4:] == 0).all()) and bool((logits[:, :4] != 0).any())
    off = load_experiment(
        None,
        [
            "strategy.name=heterofl",
            "federation.clients=3",
            "model.name=mlp",
            "model.hidden=8",
            "strategy.mask=false",
            "strategy.scaler=false",
        ],
    )
    plain = HeteroFLClient(off, INFO, torch.device("cpu"))
    out = plain.train(content, data, server_round=1, state=RecordDict())
    assert LABEL_SPLIT not in out


def test_width_metrics_evaluate_each_width_slice_on_the_test_set() -> None:
    torch.manual_seed(0)
    model = MLP(64, 8, 10, 0.0)
    test = fake_client(0).test
    setup = SimpleNamespace(
        model=model,
        data=SimpleNamespace(test=test),
        options=SimpleNamespace(capacities=(1.0, 0.5, 0.25)),
        device=torch.device("cpu"),
    )
    arrays = message_content(
        {k: v.detach().numpy() for k, v in model.state_dict().items()}
    )[ARRAYS]
    got = width_metrics(setup, arrays)  # type: ignore[arg-type]
    assert set(got) == {"loss-w0.5", "accuracy-w0.5", "loss-w0.25", "accuracy-w0.25"}
    for r in (0.5, 0.25):
        sub = sub_model(model, r).eval()
        logits = sub(torch.from_numpy(test.x))
        acc = float((logits.argmax(1).numpy() == test.y).mean())
        assert got[f"accuracy-w{r:g}"] == pytest.approx(acc)
