"""The ``anneal`` codec (one bit width, annealed over the rounds) against a
hand-computed schedule and a numpy quantisation oracle."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fedsim.core.errors import ConfigError
from fedsim.core.loading import load_experiment
from fedsim.core.messages import ACTIVATIONS, CONFIG, CUT, GRADIENT, SERVER_ROUND
from fedsim.learn.anneal import Annealed, scheduled_bits
from fedsim.learn.codecs import FixedBits
from tests.conftest import experiment, run_rounds

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    ("rounds", "start", "end", "expected"),
    [
        # 8 + (4 - 8) * (r - 1) / 9 = 8, 7.56, 7.11, 6.67, 6.22, 5.78, 5.33,
        # 4.89, 4.44, 4 -> rounded half up:
        (10, 8, 4, [8, 8, 7, 7, 6, 6, 5, 5, 4, 4]),
        (5, 8, 4, [8, 7, 6, 5, 4]),
        # 8 - 4 * (r - 1) / 7: 8, 7.43, 6.86, 6.29, 5.71, 5.14, 4.57, 4
        (8, 8, 4, [8, 7, 7, 6, 6, 5, 5, 4]),
        # 2 + 6 * (r - 1) / 3 = 2, 4, 6, 8 (rising works too)
        (4, 2, 8, [2, 4, 6, 8]),
        # 4 + (5 - 4) * (r - 1) / 2 = 4, 4.5, 5: the half rounds up
        (3, 4, 5, [4, 5, 5]),
        (1, 8, 4, [8]),
        (3, 6, 6, [6, 6, 6]),
    ],
)
def test_schedule_is_the_hand_computed_one(rounds, start, end, expected) -> None:
    got = [
        scheduled_bits(r, rounds, start_bits=start, end_bits=end)
        for r in range(1, rounds + 1)
    ]
    assert got == expected


def test_rounds_outside_the_run_and_widths_outside_1_to_16_are_refused() -> None:
    with pytest.raises(ValueError, match="round 0"):
        scheduled_bits(0, 3, start_bits=8, end_bits=4)
    with pytest.raises(ValueError, match="round 4"):
        scheduled_bits(4, 3, start_bits=8, end_bits=4)
    with pytest.raises(ValueError, match="start_bits"):
        Annealed(start_bits=17, end_bits=4)
    with pytest.raises(ValueError, match="end_bits"):
        Annealed(start_bits=8, end_bits=0)


def numpy_quantised(x: np.ndarray, bits: int) -> np.ndarray:
    """Oracle: per-channel (axis 1 of 4-d, else last) min-max quantisation at
    ``bits``, ``lo + step * round((x - lo) / step)``, in float64."""
    axis = 1 if x.ndim == 4 else x.ndim - 1
    moved = np.moveaxis(x.astype(np.float64), axis, -1)
    lo = moved.min(axis=tuple(range(moved.ndim - 1)), keepdims=True)
    hi = moved.max(axis=tuple(range(moved.ndim - 1)), keepdims=True)
    step = (hi - lo) / (2**bits - 1)
    return np.moveaxis(lo + step * np.round((moved - lo) / step), -1, axis)


@pytest.mark.parametrize("shape", [(7, 10), (3, 5, 6), (4, 3, 5, 5)])
def test_each_round_quantises_like_numpy_at_the_scheduled_width(shape) -> None:
    """Round r of 5 (8 -> 4): every channel at ``8 - (r - 1)`` bits, the values
    those of the numpy oracle, the integers packed at exactly that width; the
    answering side replies at the widths it decoded."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(shape) * 3 + 1).astype(np.float32)
    axis = 1 if len(shape) == 4 else len(shape) - 1
    channels, n = shape[axis], math.prod(shape) // shape[axis]
    client, server = (
        Annealed(start_bits=8, end_bits=4),
        Annealed(start_bits=8, end_bits=4),
    )
    for r in range(1, 6):
        client.at_round(r, 5)
        bits = 9 - r
        arrays = client.encode(x)
        np.testing.assert_array_equal(arrays["bits"], np.full(channels, bits))
        assert arrays["packed"].nbytes == math.ceil(n * channels * bits / 8)
        x_hat = server.decode(arrays)
        np.testing.assert_allclose(x_hat, numpy_quantised(x, bits), atol=1e-5)
        np.testing.assert_array_equal(server.encode(x)["bits"], arrays["bits"])


def test_eight_fixed_bits_decode_like_int8() -> None:
    """``anneal`` at 8 -> 8 bits is fixed precision: the same values as the
    ``int8`` codec (same quantiser, another packing)."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((16, 12)).astype(np.float32)
    codec = Annealed(start_bits=8, end_bits=8)
    codec.at_round(3, 4)
    ours = codec.decode(codec.encode(x))
    fixed = FixedBits(8)
    np.testing.assert_allclose(ours, fixed.decode(fixed.encode(x)), atol=1e-5)


@pytest.mark.parametrize("value", ["0", "17"])
def test_bit_widths_outside_1_to_16_are_a_config_error(value: str) -> None:
    for key in ("split.anneal-start-bits", "split.anneal-end-bits"):
        with pytest.raises(ConfigError, match=f"{key}: {value} must be in 1..16"):
            load_experiment(
                None,
                ["strategy.name=sfl-v1", "split.quantization=anneal", f"{key}={value}"],
            )


def test_sfl_v1_with_anneal_sends_each_round_at_its_width(
    task_identity: None, tmp_path: Path
) -> None:
    """SplitFed V1 with ``split.quantization = anneal`` over 3 rounds (8 -> 4):
    the recorded mean bit width is 8, 6, 4 exactly; every activation message
    goes up at its round's width and its gradient comes down at the same."""
    exp = experiment(
        "sfl-v1", "split.quantization=anneal", "federation.clients=2", "rounds=3"
    )
    _, fake, recorder = run_rounds(exp, 3, tmp_path)
    means = [
        value
        for _, client, _, name, value in recorder.rows
        if client is None and name == "mean-bits"
    ]
    assert means == [8.0, 6.0, 4.0]
    checked = 0
    for message, answer in fake.log:
        server_round = int(message.content.config_records[CONFIG][SERVER_ROUND])
        bits = {1: 8, 2: 6, 3: 4}[server_round]
        if CUT in message.content:
            down = message.content.array_records[CUT][f"{GRADIENT}.bits"].numpy()
            assert set(down.tolist()) == {bits}
        if CUT in answer.content:
            up = answer.content.array_records[CUT][f"{ACTIVATIONS}.bits"].numpy()
            assert set(up.tolist()) == {bits}
            checked += 1
    assert checked > 6
