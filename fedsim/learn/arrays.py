"""The arrays every dataset becomes: features, labels and (optionally) the
values of the column that partitions the rows."""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from typing import Any

import numpy as np


def take(x: Any, index: np.ndarray) -> np.ndarray:
    """``x[index]`` as a new array (``index``: row numbers).

    From a memory-mapped ``.npy`` file (:mod:`fedsim.learn.data_cache`), the
    rows are read with ``os.preadv`` (one read per run of consecutive rows)
    instead of through the map: the same bytes, but the process's map never
    pages them in, so copying a client's partition -- or, in the CLI's
    pre-run check, every client's -- leaves the file's pages in the shared
    page cache and not in the process's resident (proportional) memory."""
    index = np.asarray(index)
    if (
        not isinstance(x, np.memmap)
        or x.filename is None
        or not x.flags.c_contiguous
        or not isinstance(x.base, mmap.mmap)  # a whole file's array, not a view
        or index.ndim != 1
        or index.dtype.kind not in "iu"
        or len(x) == 0
    ):
        return np.asarray(x[index])
    index = np.where(index < 0, index + len(x), index)
    if len(index) and (index.min() < 0 or index.max() >= len(x)):
        raise IndexError(f"row numbers out of range 0..{len(x) - 1}")
    out = np.empty((len(index), *x.shape[1:]), x.dtype)
    row = out.itemsize * (out[0].size if len(out) else 0)
    if row == 0 or len(index) == 0:
        return out
    starts = np.flatnonzero(np.diff(index, prepend=index[0] - 2) != 1)
    ends = np.append(starts[1:], len(index))
    view = memoryview(out.reshape(-1).view(np.uint8))
    with open(os.fspath(x.filename), "rb", buffering=0) as f:
        for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
            offset = x.offset + int(index[a]) * row
            done, size = 0, (b - a) * row
            while done < size:
                got = os.preadv(
                    f.fileno(), [view[a * row + done : b * row]], offset + done
                )
                if got <= 0:
                    raise OSError(f"{os.fspath(x.filename)}: short read")
                done += got
    return out


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about the data."""

    input_shape: tuple[int, ...]
    num_classes: int


@dataclass(frozen=True)
class Arrays:
    """Features and labels of one split.

    ``x`` is a numpy array (in memory or memory-mapped), or, straight from a
    loader, any object indexed like one by an array of row numbers that
    decodes rows on demand (:class:`fedsim.learn.hf_source.ImageRows`).
    ``ids`` holds the ``data.partition-by`` column when one is set (a loader's
    output only).
    """

    x: Any
    y: np.ndarray
    ids: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: np.ndarray) -> Arrays:
        ids = None if self.ids is None else self.ids[index]
        return Arrays(take(self.x, index), self.y[index], ids)


@dataclass(frozen=True)
class ClientData:
    """One client's local train and test splits."""

    partition_id: int
    train: Arrays
    test: Arrays
