"""The arrays every dataset becomes: features, labels and (optionally) the
values of the column that partitions the rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


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
        return Arrays(np.asarray(self.x[index]), self.y[index], ids)


@dataclass(frozen=True)
class ClientData:
    """One client's local train and test splits."""

    partition_id: int
    train: Arrays
    test: Arrays
