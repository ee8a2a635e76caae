"""FedIT: elementwise averages of A and B, zero-padded ranks, the noise that
averaging factors adds; ``fedit`` continuing the global factors over rounds
(against numpy and PEFT), ``fedit-merge`` merging them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from fedsim.core.loading import load_experiment
from fedsim.core.messages import ARRAYS, LORA_SCALING, METRICS, NUM_EXAMPLES
from fedsim.strategies.fedit import average_lora, client_adapters, global_adapters
from fedsim.strategies.fedit.server import FedITMerge
from fedsim.strategies.flora import aggregation_error, exact_update, lora_update
from fedsim.strategies.flora.server import FLoRA

A, B = "layer.lora_A.weight", "layer.lora_B.weight"


def adapters_of(ranks: list[int], seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{A: rng.normal(size=(r, 5)), B: rng.normal(size=(4, r))} for r in ranks]


def test_average_lora_is_the_elementwise_weighted_average() -> None:
    adapters = adapters_of([3, 3, 3])
    for ad in adapters:
        ad["head.weight"] = np.ones((2, 2))  # not a LoRA array: left out
    weights = [2.0, 5.0, 3.0]
    avg = average_lora(adapters, weights)
    assert set(avg) == {A, B}
    for key in (A, B):
        expected = sum(w / 10.0 * ad[key] for w, ad in zip(weights, adapters))
        np.testing.assert_allclose(avg[key], expected, rtol=1e-12)


def test_heterogeneous_ranks_are_zero_padded_and_inexact() -> None:
    adapters = adapters_of([4, 2, 1])
    weights = [1.0, 1.0, 2.0]
    avg = average_lora(adapters, weights)
    assert avg[A].shape == (4, 5) and avg[B].shape == (4, 4)
    padded_a = [np.vstack([ad[A], np.zeros((4 - len(ad[A]), 5))]) for ad in adapters]
    padded_b = [
        np.hstack([ad[B], np.zeros((4, 4 - ad[B].shape[1]))]) for ad in adapters
    ]
    p = np.array(weights) / 4.0
    np.testing.assert_allclose(avg[A], sum(pk * a for pk, a in zip(p, padded_a)))
    np.testing.assert_allclose(avg[B], sum(pk * b for pk, b in zip(p, padded_b)))
    # The rows a rank-1 client lacks are averaged over fewer clients.
    np.testing.assert_allclose(avg[A][3], p[0] * adapters[0][A][3])
    exact = exact_update(adapters, weights)["layer"]
    error = aggregation_error({"layer": lora_update(avg[A], avg[B])}, {"layer": exact})
    assert error > 0.1


def test_fedit_is_exact_when_clients_share_a() -> None:
    """The noise is the cross terms B_j A_k: with one shared A there are none."""
    rng = np.random.default_rng(1)
    shared = rng.normal(size=(3, 5))
    adapters = [{A: shared, B: rng.normal(size=(4, 3))} for _ in range(3)]
    weights = [1.0, 2.0, 3.0]
    avg = average_lora(adapters, weights)
    exact = exact_update(adapters, weights)["layer"]
    np.testing.assert_allclose(lora_update(avg[A], avg[B]), exact, rtol=1e-12)


def reply(adapter: dict[str, np.ndarray], examples: int, scaling: float) -> RecordDict:
    return RecordDict(
        {
            ARRAYS: ArrayRecord(
                array_dict={k: Array(v.astype(np.float32)) for k, v in adapter.items()}
            ),
            METRICS: MetricRecord({NUM_EXAMPLES: examples, LORA_SCALING: scaling}),
        }
    )


def test_fedit_merge_applies_scaled_factor_averages_and_reports_the_noise() -> None:
    rng = np.random.default_rng(2)
    ranks, examples, alpha = [4, 2], [30, 10], 8.0
    adapters = adapters_of(ranks, seed=3)
    heads = [rng.normal(size=(3, 4)).astype(np.float32) for _ in ranks]
    for ad, head in zip(adapters, heads):
        ad["head.weight"] = head
    weight = rng.normal(size=(4, 5)).astype(np.float32)
    global_arrays = ArrayRecord(
        array_dict={
            "layer.weight": Array(weight),
            "layer.bias": Array(np.zeros(4, np.float32)),
            "head.weight": Array(np.zeros((3, 4), np.float32)),
        }
    )
    contents = [reply(ad, n, alpha / r) for ad, n, r in zip(adapters, examples, ranks)]
    lora_only = [
        {
            k: v.astype(np.float32).astype(np.float64)
            for k, v in ad.items()
            if "lora" in k
        }
        for ad in adapters
    ]
    p = np.array(examples) / 40.0
    scalings = [alpha / r for r in ranks]

    merged, error = FedITMerge(adapted=["layer"], trained=["head.weight"]).merge(
        global_arrays, contents
    )
    avg_a = p[0] * lora_only[0][A] + p[1] * np.vstack(
        [lora_only[1][A], np.zeros((2, 5))]
    )
    avg_sb = p[0] * scalings[0] * lora_only[0][B] + p[1] * scalings[1] * np.hstack(
        [lora_only[1][B], np.zeros((4, 2))]
    )
    np.testing.assert_allclose(
        merged["layer.weight"].numpy(), weight + avg_sb @ avg_a, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_array_equal(merged["layer.bias"].numpy(), np.zeros(4))
    np.testing.assert_allclose(
        merged["head.weight"].numpy(), p[0] * heads[0] + p[1] * heads[1], rtol=1e-6
    )
    exact = exact_update(lora_only, examples, scalings)["layer"]
    assert error == pytest.approx(
        np.linalg.norm(avg_sb @ avg_a - exact) / np.linalg.norm(exact), rel=1e-9
    )
    assert error > 0.1

    merged_flora, flora_error = FLoRA(adapted=["layer"], trained=["head.weight"]).merge(
        global_arrays, contents
    )
    assert flora_error < 1e-12
    np.testing.assert_allclose(
        merged_flora["layer.weight"].numpy(), weight + exact, rtol=1e-5, atol=1e-5
    )


# -- fedit: clients continue the global factors ------------------------------------
VIT = (
    "strategy.name=fedit",
    "model.name=vit",
    "model.hidden=16",
    "model.depth=1",
    "model.heads=2",
    "federation.clients=3",
    "rounds=2",
    "train.epochs=1",
    "train.optimizer=adam",
    "train.lr=0.01",
    "peft.method=lora",
    "peft.ranks=[4, 2]",
    "peft.targets=['q_proj', 'v_proj']",
)
MODULES = ("blocks.0.attn.q_proj", "blocks.0.attn.v_proj")


def test_global_adapters_fold_scalings_and_pad_to_the_run_rank() -> None:
    adapters = adapters_of([2, 1], seed=4)
    weights, scalings = [3.0, 1.0], [2.0, 5.0]
    shared = global_adapters(adapters, weights, scalings, rank=4)
    assert shared[A].shape == (4, 5) and shared[B].shape == (4, 4)
    a, b = np.zeros((4, 5)), np.zeros((4, 4))
    for w, s, ad in zip([0.75, 0.25], scalings, adapters):
        r = ad[A].shape[0]
        a[:r] += w * ad[A]
        b[:, :r] += w * s * ad[B]
    np.testing.assert_allclose(shared[A], a, rtol=1e-12)
    np.testing.assert_allclose(shared[B], b, rtol=1e-12)
    # A client of rank 2 and scaling 3 continues with s B_2 A_2 = B[:, :2] A[:2].
    mine = client_adapters(shared, rank=2, scaling=3.0)
    np.testing.assert_allclose(
        3.0 * mine[B] @ mine[A], b[:, :2] @ a[:2], rtol=1e-12, atol=1e-15
    )


def oracle_round(
    uploads: list[dict[str, np.ndarray]], examples: list[float], scalings: list[float]
) -> dict[str, np.ndarray]:
    """FedIT's global factors from the clients' uploads, in plain numpy."""
    p = np.array(examples) / sum(examples)
    out = {}
    for m in MODULES:
        a, b = np.zeros((4, 16)), np.zeros((16, 4))
        for pk, sk, up in zip(p, scalings, uploads):
            r = up[f"{m}.lora_A.weight"].shape[0]
            a[:r] += pk * up[f"{m}.lora_A.weight"]
            b[:, :r] += pk * sk * up[f"{m}.lora_B.weight"]
        out[f"{m}.lora_A.weight"], out[f"{m}.lora_B.weight"] = a, b
    return out


def test_fedit_rounds_continue_the_averaged_factors(tmp_path, task_identity) -> None:
    """Two in-process rounds: round 2 sends the numpy average of round 1's factors
    (never merged: the adapted base weights are not sent and stay W0), clients
    start from their rank's slice (checked with PEFT's own delta weight), and
    the returned global model is W0 + B A of round 2's averages."""
    from peft.tuners.lora import LoraLayer

    from fedsim.clients.fedit import FedITClient
    from fedsim.learn.lora import inject_lora, scaling_for
    from tests.conftest import run_rounds

    exp = load_experiment(None, list(VIT))
    final, grid, _ = run_rounds(exp, 2, tmp_path)
    train = [(m, r) for m, r in grid.log if m.metadata.message_type == "train"]
    assert len(train) == 6
    rounds: dict[int, list] = {1: [], 2: []}
    for msg, reply_msg in train:
        rounds[int(msg.content["config"]["server-round"])].append((msg, reply_msg))
    round1 = sorted(rounds[1], key=lambda mr: mr[1].content[METRICS]["partition-id"])

    def unpack(pairs):
        ups = [{k: v.numpy() for k, v in r.content[ARRAYS].items()} for _, r in pairs]
        ex = [float(r.content[METRICS][NUM_EXAMPLES]) for _, r in pairs]
        sc = [float(r.content[METRICS][LORA_SCALING]) for _, r in pairs]
        return ups, ex, sc

    ups, ex, sc = unpack(round1)
    for msg, _ in round1:  # round 1: only the head goes down
        assert set(msg.content[ARRAYS]) == {"head.weight", "head.bias"}
    a0 = FedITClient(exp, grid.data.info, torch.device("cpu"))
    expected = oracle_round(ups, ex, sc)
    for msg, _ in rounds[2]:
        sent = {k: v.numpy() for k, v in msg.content[ARRAYS].items()}
        assert set(sent) == {*expected, "head.weight", "head.bias"}
        for key, value in expected.items():
            np.testing.assert_allclose(sent[key], value, rtol=1e-6, atol=1e-7)

    # A rank-2 client continues from B[:, :2] A[:2] (PEFT's delta weight).
    client = FedITClient(exp, grid.data.info, torch.device("cpu"))
    msg = rounds[2][0][0]
    client.load(msg.content)
    model = inject_lora(client.base, exp.peft, client.layout, rank=2, init_seed=0)
    client.start(msg.content, 2)
    for m in MODULES:
        layer = client.base.get_submodule(m)
        assert isinstance(layer, LoraLayer)
        delta = layer.get_delta_weight("default").detach().numpy()
        sent = {k: v.numpy().astype(np.float64) for k, v in msg.content[ARRAYS].items()}
        want = sent[f"{m}.lora_B.weight"][:, :2] @ sent[f"{m}.lora_A.weight"][:2]
        np.testing.assert_allclose(delta, want, rtol=1e-5, atol=1e-7)
        assert layer.scaling["default"] == scaling_for(exp.peft, 2)
    model.unload()

    # The global model after round 2: W0 + B A, the head averaged.
    ups, ex, sc = unpack(rounds[2])
    shared = oracle_round(ups, ex, sc)
    initial = a0.initial
    p = np.array(ex) / sum(ex)
    for m in MODULES:
        w0 = initial[f"{m}.weight"].numpy().astype(np.float64)
        update = shared[f"{m}.lora_B.weight"] @ shared[f"{m}.lora_A.weight"]
        np.testing.assert_allclose(
            final[f"{m}.weight"].numpy(), w0 + update, rtol=1e-5, atol=1e-6
        )
    head = sum(pk * up["head.weight"] for pk, up in zip(p, ups))
    np.testing.assert_allclose(final["head.weight"].numpy(), head, rtol=1e-5)


@pytest.mark.parametrize("a_init", ["per-client", "shared"])
def test_fedit_round_one_a_is_drawn_per_client_unless_shared(a_init) -> None:
    """Partitions 0 and 2 (both rank 4) start from different A unless
    ``strategy.a-init = "shared"``; a partition's A does not depend on the
    round (it is drawn once, before its first aggregation)."""
    from fedsim.clients.fedit import FedITClient
    from fedsim.learn.data import federated_data
    from fedsim.learn.lora import inject_lora

    exp = load_experiment(None, [*VIT, f"strategy.a-init={a_init}"])
    data = federated_data(exp.data, exp.federation.clients, exp.seed)
    client = FedITClient(exp, data.info, torch.device("cpu"))
    starts = []
    for pid, rnd in ((0, 1), (2, 1), (0, 5)):
        seed = client.init_seed(pid, rnd)
        model = inject_lora(
            client.base, exp.peft, client.layout, rank=4, init_seed=seed
        )
        layer = client.base.get_submodule(MODULES[0])
        starts.append(layer.lora_A["default"].weight.detach().clone())
        model.unload()
    assert torch.equal(starts[0], starts[1]) == (a_init == "shared")
    assert torch.equal(starts[0], starts[2])


def test_fedit_server_state_round_trips(tmp_path) -> None:
    from fedsim.engine.server import resume_checkpoint
    from fedsim.strategies.fedit.server import FedIT

    server = FedIT(
        adapted=["layer"],
        trained=[],
        base={"layer.weight": Array(np.zeros((4, 5), np.float32))},
        rank=3,
    )
    server.shared = global_adapters(adapters_of([3, 2]), [1.0, 1.0], [2.0, 4.0], rank=3)
    saved = resume_checkpoint.unpack(resume_checkpoint.pack(server.checkpoint_state()))
    again = FedIT(adapted=["layer"], trained=[], base=server.base, rank=3)
    again.restore_state(saved)
    assert set(again.shared) == {A, B}
    for key in (A, B):
        np.testing.assert_array_equal(again.shared[key], server.shared[key])
