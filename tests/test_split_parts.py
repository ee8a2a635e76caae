"""Split learning's parts: the cut models, the codecs, the config section, the
bytes a round records."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsim.core.errors import ConfigError
from fedsim.core.loading import from_run_config, load_experiment, to_run_config
from fedsim.core.messages import ACTIVATIONS, CUT, LABELS
from fedsim.learn.codecs import CODECS, FixedBits, Identity, pack4, unpack4
from fedsim.learn.models import CNN, MLP, ViT
from fedsim.learn.split import cut_points, from_record, split_model, stage_names
from tests.conftest import experiment, run_rounds

MODELS = {
    "mlp": (lambda: MLP(20, 8, 3, 0.0), (5, 20)),
    "cnn": (lambda: CNN((1, 8, 8), 8, 3, 0.0), (5, 1, 8, 8)),
    "vit": (
        lambda: ViT((1, 8, 8), 3, dim=8, depth=2, heads=2, patch_size=4, dropout=0.0),
        (5, 1, 8, 8),
    ),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_segments_run_in_order_are_the_model_at_every_cut(name: str) -> None:
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = build()
    x = torch.randn(shape)
    expected = model(x)
    names = stage_names(model)
    params = {n for n, _ in model.named_parameters()}
    for cut in range(len(names) - 1):
        segments = split_model(model, [cut])
        out = x
        for segment in segments:
            out = segment(out)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        owned = [n for s in segments for n in s.state()]
        assert sorted(owned) == sorted(model.state_dict())  # each entry once
        assert {n for s in segments for n in dict(s.model.named_parameters())} >= params


def test_cuts_by_name_index_default_and_bad_names() -> None:
    model = ViT((1, 8, 8), 3, dim=8, depth=2, heads=2, patch_size=4, dropout=0.0)
    assert stage_names(model) == ["embed", "blocks.0", "blocks.1", "pool", "head"]
    assert cut_points(model, "") == [1]  # default: after blocks.0
    assert cut_points(model, "embed") == cut_points(model, "0") == [0]
    assert cut_points(model, "embed", "pool") == [0, 2]
    with pytest.raises(
        ConfigError, match=r"split.cut: 'blocks.9' is not a stage.*embed"
    ):
        cut_points(model, "blocks.9")
    with pytest.raises(
        ConfigError, match="split.cut: 'head' leaves the server no stage"
    ):
        cut_points(model, "head")
    with pytest.raises(ConfigError, match="split.tail: 'blocks.1' must start at least"):
        cut_points(model, "blocks.0", "blocks.1")


# -- codecs ----------------------------------------------------------------------


def test_none_codec_reproduces_floats_exactly() -> None:
    x = np.random.default_rng(0).standard_normal((7, 5)).astype(np.float32)
    out = Identity().decode(Identity().encode(x))
    assert out.dtype == np.float32 and np.array_equal(out, x)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape", [(9, 5), (3, 4, 5, 2), (2, 3, 7)])
def test_fixed_bits_round_trip_error_is_at_most_half_a_step(
    bits: int, shape: tuple[int, ...]
) -> None:
    """Per channel, the error is <= scale/2 with scale = (max - min) / (2^b - 1),
    computed here from the input alone."""
    rng = np.random.default_rng(bits)
    x = (rng.standard_normal(shape) * rng.uniform(0.1, 10, shape[-1])).astype(
        np.float32
    )
    codec = FixedBits(bits)
    encoded = codec.encode(x)
    out = codec.decode(encoded)
    axis = 1 if x.ndim == 4 else x.ndim - 1
    other = tuple(a for a in range(x.ndim) if a != axis)
    step = (x.max(axis=other) - x.min(axis=other)) / (2**bits - 1)
    bound = np.expand_dims(step / 2, other) * (1 + 1e-5) + 1e-7
    assert out.shape == x.shape
    assert (np.abs(out - x) <= bound).all()
    assert np.abs(out - x).max() > 0  # it did quantize
    count = int(np.prod(shape))
    assert encoded["codes"].nbytes == (count if bits == 8 else (count + 1) // 2)
    assert encoded["scale"].shape == encoded["zero"].shape == (shape[axis],)


def test_int4_packing_round_trips_odd_counts() -> None:
    codes = np.random.default_rng(1).integers(0, 16, 11).astype(np.uint8)
    packed = pack4(codes)
    assert packed.nbytes == 6
    assert np.array_equal(unpack4(packed, 11), codes)
    assert packed[0] == codes[0] | (codes[1] << 4)


def test_constant_channel_decodes_exactly() -> None:
    x = np.full((4, 3), 2.5, dtype=np.float32)
    assert np.array_equal(FixedBits(8).decode(FixedBits(8).encode(x)), x)


def test_codec_registry_is_open_and_checked() -> None:
    assert {"none", "int8", "int4"} <= set(CODECS)
    with pytest.raises(ConfigError, match="split.quantization: 'int3' is not a codec"):
        load_experiment(None, ["strategy.name=sfl-v1", "split.quantization=int3"])


# -- the [split] section ---------------------------------------------------------


def test_split_keys_live_in_their_own_section_and_round_trip() -> None:
    exp = load_experiment(
        None, ["strategy.name=split-ushape", "split.cut=body.1", "split.tail=head"]
    )
    assert exp.strategy.options.cut == "body.1"
    flat = to_run_config(exp)
    assert flat["split.cut"] == "body.1" and "strategy.cut" not in flat
    assert from_run_config(flat) == exp
    with pytest.raises(ConfigError, match="strategy.cut: unknown key"):
        load_experiment(None, ["strategy.name=sfl-v1", "strategy.cut=body.1"])
    with pytest.raises(ConfigError, match="split.tail: unknown key"):
        load_experiment(None, ["strategy.name=sfl-v1", "split.tail=head"])


def test_dp_is_rejected_with_its_reason() -> None:
    with pytest.raises(ConfigError, match="cannot run under privacy.mechanism"):
        load_experiment(
            None,
            [
                "strategy.name=sfl-v2",
                "privacy.mechanism=dp-sgd",
                "privacy.noise-multiplier=1",
            ],
        )


# -- bytes -----------------------------------------------------------------------


def serialised(array: np.ndarray) -> int:
    """What one array weighs in a message: its ``.npy`` serialisation."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return len(buffer.getvalue())


@pytest.mark.parametrize("codec", ["none", "int8", "int4"])
def test_recorded_bytes_are_what_was_sent(
    codec: str, task_identity: None, tmp_path: Path
) -> None:
    """Per client and round, ``bytes-up`` / ``bytes-down`` equal the sum over
    every message of its arrays' serialised size plus their names; the cut
    payload is what the codec's bit width implies (batch x 16 channels)."""
    exp = experiment("sfl-v1", "federation.clients=2", f"split.quantization={codec}")
    _, grid, recorder = run_rounds(exp, 1, tmp_path)
    up: dict[int, int] = {}
    down: dict[int, int] = {}
    for msg, reply in grid.log:
        node = msg.metadata.dst_node_id
        for target, content in ((down, msg.content), (up, reply.content)):
            for rec in content.array_records.values():
                for key, array in rec.items():
                    target[node] = (
                        target.get(node, 0) + serialised(array.numpy()) + len(key)
                    )
        if CUT in reply.content:
            cut = from_record(reply.content[CUT])
            rows = len(cut[LABELS])
            payload = {k: v.nbytes for k, v in cut.items() if k != LABELS}
            values = rows * 16
            codes = {"none": 4 * values, "int8": values, "int4": (values + 1) // 2}[
                codec
            ]
            key = f"{ACTIVATIONS}.values" if codec == "none" else f"{ACTIVATIONS}.codes"
            assert payload[key] == codes
            if codec != "none":
                assert (
                    payload[f"{ACTIVATIONS}.scale"]
                    == payload[f"{ACTIVATIONS}.zero"]
                    == 64
                )
    rows = {
        (client, metric): value
        for (rnd, client, phase, metric, value) in recorder.rows
        if phase == "train" and client is not None
    }
    for node, pid in grid.partitions.items():
        assert rows[(pid, "bytes-up")] == up[node]
        assert rows[(pid, "bytes-down")] == down[node]


def test_int8_trains_close_to_float(task_identity: None, tmp_path: Path) -> None:
    """The same run with int8 activations and gradients: a different model,
    close to the float one (the quantization error is small per step)."""
    float_final, _, _ = run_rounds(
        experiment("sfl-v1", "federation.clients=2"), 1, tmp_path / "a"
    )
    int8_final, _, _ = run_rounds(
        experiment("sfl-v1", "federation.clients=2", "split.quantization=int8"),
        1,
        tmp_path / "b",
    )
    a, b = float_final.to_torch_state_dict(), int8_final.to_torch_state_dict()
    diffs = [float((a[k] - b[k]).abs().max()) for k in a]
    assert max(diffs) > 0
    assert max(diffs) < 0.05


def test_a_family_section_may_not_be_an_experiment_section() -> None:
    from dataclasses import replace

    from fedsim.core.loading import option_keys
    from fedsim.strategies.split import V1

    assert set(option_keys(V1)) == {
        "split.cut",
        "split.quantization",
        "split.min-bits",
        "split.max-bits",
        "split.amaq-start-bits",
        "split.amaq-end-bits",
        "split.amaq-weight",
        "split.amaq-lr",
        "split.anneal-start-bits",
        "split.anneal-end-bits",
    }
    with pytest.raises(ValueError, match="section 'train' is an experiment section"):
        option_keys(replace(V1, section="train"))
