"""Half-precision models over the wire: what clients send with ``model.dtype =
"float16"`` / ``"bfloat16"`` and how the server aggregates it (in float64,
cast back), against numpy oracles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedsim.core.loading import load_experiment
from fedsim.core.messages import ARRAYS, LORA_SCALING, METRICS, NUM_EXAMPLES
from tests.hf_assets import HfAssets

FLORA = (
    "strategy.name=flora",
    "peft.method=lora",
    'peft.targets=["q_proj","v_proj"]',
    "peft.modules-to-save=[]",
)


def run(assets: HfAssets, dtype: str, tmp_path: Path, *more: str) -> tuple:
    from tests.conftest import run_rounds

    exp = load_experiment(
        None,
        [
            "model.name=hf",
            f"model.path={assets.llama}",
            "model.task=causal-lm",
            f"model.dtype={dtype}",
            "federation.clients=2",
            "data.partitioner=iid",
            "data.max-length=320",
            "train.batch-size=8",
            "rounds=1",
            "data.dataset=file",
            f"data.path={assets.alpaca}",
            "data.format=alpaca",
            *more,
        ],
    )
    final, grid, _ = run_rounds(exp, 1, tmp_path)
    trains = [(m, r) for m, r in grid.log if m.metadata.message_type == "train"]
    return final, trains


def numpy_arrays(record: object) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in record.items()}  # type: ignore[attr-defined]


def test_weighted_mean_accumulates_in_float64() -> None:
    """FedAvg's mean of float16 arrays equals the float64 mean cast to float16;
    Flower's own aggregate (accumulating in float16) does not."""
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    from fedsim.strategies.fedavg.maths import weighted_mean

    rng = np.random.default_rng(0)
    clients = [{"w": rng.normal(size=400).astype(np.float16)} for _ in range(12)]
    weights = [float(w) for w in rng.integers(1, 50, size=12)]
    p = np.array(weights) / sum(weights)
    oracle = sum(pk * c["w"].astype(np.float64) for pk, c in zip(p, clients))
    mean = weighted_mean(clients, weights)["w"]
    assert mean.dtype == np.float16
    np.testing.assert_array_equal(mean, np.asarray(oracle).astype(np.float16))
    flower = aggregate_arrayrecords(
        [
            RecordDict(
                {
                    ARRAYS: ArrayRecord({"w": Array(c["w"])}),
                    METRICS: MetricRecord({NUM_EXAMPLES: w}),
                }
            )
            for c, w in zip(clients, weights)
        ],
        NUM_EXAMPLES,
    )["w"].numpy()
    assert (flower != mean).any()


def test_float16_lora_sends_half_the_bytes_and_flora_merges_in_float64(
    hf_assets: HfAssets, tmp_path: Path, task_identity: None
) -> None:
    """float16 model: the global weights go down and the adapters come up in
    float16 (2 bytes an element); FLoRA's merged weight is the float64 oracle
    W0 + sum_k p_k s_k B_k A_k of what was sent, cast to float16."""
    final, trains = run(hf_assets, "float16", tmp_path, *FLORA)
    sent = numpy_arrays(trains[0][0].content[ARRAYS])
    ups = [numpy_arrays(r.content[ARRAYS]) for _, r in trains]
    assert {a.dtype for a in sent.values()} == {np.dtype(np.float16)}
    for up in ups:
        assert {a.dtype for a in up.values()} == {np.dtype(np.float16)}
        assert sum(a.nbytes for a in up.values()) == 2 * sum(
            a.size for a in up.values()
        )
    n = np.array([float(r.content[METRICS][NUM_EXAMPLES]) for _, r in trains])
    s = [float(r.content[METRICS][LORA_SCALING]) for _, r in trains]
    p = n / n.sum()
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in ups[0]})
    assert len(modules) == 4  # q_proj and v_proj of 2 layers
    for module in modules:
        w0 = sent[f"{module}.weight"].astype(np.float64)
        delta = sum(
            pk
            * sk
            * up[f"{module}.lora_B.weight"].astype(np.float64)
            @ up[f"{module}.lora_A.weight"].astype(np.float64)
            for pk, sk, up in zip(p, s, ups)
        )
        merged = final[f"{module}.weight"].numpy()
        assert merged.dtype == np.float16
        np.testing.assert_array_equal(merged, (w0 + delta).astype(np.float16))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_full_training_in_half_precision_sends_and_averages_exactly(
    hf_assets: HfAssets, tmp_path: Path, task_identity: None, dtype: str
) -> None:
    """FedAvg of a half-precision model. float16: every array travels as
    float16 and the global model is the float64 weighted mean cast back.
    bfloat16 (numpy has none): arrays travel as float32 holding exactly the
    model's bfloat16 values, and the mean is taken in float64."""
    final, trains = run(hf_assets, dtype, tmp_path, "strategy.name=fedavg")
    wire = np.dtype(np.float16 if dtype == "float16" else np.float32)
    ups = [numpy_arrays(r.content[ARRAYS]) for _, r in trains]
    floats = [k for k, a in ups[0].items() if np.issubdtype(a.dtype, np.floating)]
    assert floats and {ups[0][k].dtype for k in floats} == {wire}
    if dtype == "bfloat16":
        for up in ups:
            for k in floats:
                as_bf16 = torch.from_numpy(up[k]).to(torch.bfloat16).float().numpy()
                np.testing.assert_array_equal(as_bf16, up[k])
    n = np.array([float(r.content[METRICS][NUM_EXAMPLES]) for _, r in trains])
    p = n / n.sum()
    for k in floats:
        oracle = sum(pk * up[k].astype(np.float64) for pk, up in zip(p, ups))
        np.testing.assert_array_equal(final[k].numpy(), np.asarray(oracle).astype(wire))
