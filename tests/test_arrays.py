"""fedsim's ``Array.numpy`` against Flower's (``np.load``)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from flwr.app import Array

from fedsim.flwr_private import arrays

rng = np.random.default_rng(0)

CASES = {
    "float32 matrix": rng.random((64, 32)).astype(np.float32),
    "float64 vector": rng.random(7),
    "int64": rng.integers(-5, 5, (3, 4, 5)),
    "bool": rng.random((4, 4)) > 0.5,
    "uint8": rng.integers(0, 255, (10,), dtype=np.uint8),
    "float16": rng.random((2, 3)).astype(np.float16),
    "complex64": (rng.random(4) + 1j * rng.random(4)).astype(np.complex64),
    "big-endian": rng.random((3, 2)).astype(">f4"),
    "scalar": np.array(3.5, dtype=np.float32),
    "empty": np.zeros((0, 3), dtype=np.float32),
    "datetime": np.array(["2026-01-01", "2026-11-22"], dtype="datetime64[D]"),
    "strided view": rng.random((6, 6))[::2, 1::2],
}


def flower(array: Array) -> np.ndarray:
    return np.load(io.BytesIO(array.data), allow_pickle=False)


@pytest.mark.parametrize("name", CASES)
def test_fast_path_reads_what_np_load_reads(name):
    array = Array(CASES[name])
    got = arrays.read_npy(array.data, array.dtype, array.shape)
    assert got is not None, "the fast path should take np.save's own header"
    want = flower(array)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    assert got.flags.writeable and got.flags.c_contiguous and got.flags.owndata
    assert arrays.numpy(array).dtype == want.dtype


def test_other_headers_go_to_np_load():
    fortran = np.asfortranarray(rng.random((4, 3)))
    structured = np.zeros(3, dtype=[("a", "<i4"), ("b", "<f8")])
    for value in (fortran, structured):
        array = Array(value)
        assert arrays.read_npy(array.data, array.dtype, array.shape) is None
        np.testing.assert_array_equal(arrays.numpy(array), value)
    # a header that does not match the Array's own shape or dtype
    array = Array(rng.random((4, 3)))
    assert arrays.read_npy(array.data, array.dtype, (3, 4)) is None
    assert arrays.read_npy(array.data, "float32", array.shape) is None
    # truncated data, not .npy bytes, an unknown format version
    assert arrays.read_npy(array.data[:-8], array.dtype, array.shape) is None
    assert arrays.read_npy(b"not npy" * 20, array.dtype, array.shape) is None
    assert (
        arrays.read_npy(
            array.data[:6] + b"\x09" + array.data[7:], array.dtype, array.shape
        )
        is None
    )


def test_version_2_header():
    value = rng.random((5, 2))
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, value, version=(2, 0))
    got = arrays.read_npy(buffer.getvalue(), str(value.dtype), value.shape)
    np.testing.assert_array_equal(got, value)


def test_install_replaces_flowers_method(monkeypatch):
    monkeypatch.setattr(Array, "numpy", Array.numpy)
    arrays.install()
    assert Array.numpy is arrays.numpy
    value = rng.random((3, 3)).astype(np.float32)
    np.testing.assert_array_equal(Array(value).numpy(), value)
