"""Flower's ``Array.numpy`` without ``np.load``'s header parse.

A Flower message carries each array as the bytes ``np.save`` writes (``.npy``:
a magic string, a header that is a Python dict literal, then the data), and
``Array.numpy`` reads them back with ``np.load``, which parses the header with
``ast.literal_eval``: about 50 us per array whatever its size, under the GIL.
Aggregation reads every array of every reply: with 100 replies a round it
took a third of the simulation process's time, on the round's critical path.

:func:`numpy` reads the header's length, checks that the header is exactly the
one ``np.save`` writes for the array's own dtype and shape in C order and that
the data has the size they imply, then copies the data out: about 3 us, the
same array (a fresh, writable, C-contiguous copy, as ``np.load`` returns).
Anything else (Fortran order, a structured dtype, a header from another
writer) goes to Flower's own method. :func:`install` makes it
``Array.numpy``; fedsim's ServerApp and ClientApp modules install it when they
are imported, so it serves in every process that runs them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from flwr.app import Array
from flwr.common.constant import SType

from fedsim.flwr_private import version

_MAGIC = b"\x93NUMPY"
#: Flower's own ``Array.numpy`` (the fallback).
FLOWERS_NUMPY = Array.numpy


def read_npy(data: bytes, dtype: str, shape: Any) -> np.ndarray | None:
    """The array in ``data`` (``np.save``'s bytes of a C-ordered array of
    ``dtype`` and ``shape``), or None where the bytes are not exactly that."""
    try:
        dt = np.dtype(dtype)
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        return None
    if dt.hasobject or dt.itemsize == 0 or data[:6] != _MAGIC:
        return None
    if data[6] == 1:
        start, length = 10, int.from_bytes(data[8:10], "little")
    elif data[6] in (2, 3):
        start, length = 12, int.from_bytes(data[8:12], "little")
    else:
        return None
    header = f"{{'descr': {dt.str!r}, 'fortran_order': False, 'shape': {shape!r}, }}"
    expected = header.encode("latin1")
    if data[start : start + len(expected)] != expected:
        return None
    offset, count = start + length, math.prod(shape)
    if len(data) - offset != dt.itemsize * count:
        return None
    return (
        np.frombuffer(data, dtype=dt, count=count, offset=offset).reshape(shape).copy()
    )


def numpy(self: Array) -> np.ndarray:
    """``Array.numpy`` (see module doc)."""
    if self.stype == SType.NUMPY:
        out = read_npy(self.data, self.dtype, self.shape)
        if out is not None:
            return out
    return FLOWERS_NUMPY(self)  # type: ignore[no-any-return]


#: Flower's method this module replaces, and its parameters.
PATCHED = {"flwr.app.Array.numpy": ("self",)}


def install() -> bool:
    """Make :func:`numpy` Flower's ``Array.numpy`` in this process; False, and
    nothing replaced, on another Flower version (warning once)."""
    if not version.patchable("arrays", "reads arrays with np.load, ~50 us each"):
        return False
    Array.numpy = numpy  # type: ignore[method-assign]
    return True
