"""FedIT: elementwise averages of A and B, zero-padded ranks, and the noise that
averaging factors adds."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from fedsim.core.messages import ARRAYS, LORA_SCALING, METRICS, NUM_EXAMPLES
from fedsim.strategies.fedit import average_lora
from fedsim.strategies.fedit.server import FedIT
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

    merged, error = FedIT(adapted=["layer"], trained=["head.weight"]).merge(
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
