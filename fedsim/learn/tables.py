"""Checks on tabular data (a local CSV or Parquet file, a Hugging Face table).

A table that would train silently wrong is a :class:`ConfigError` naming the
file and the column(s): no rows, empty (NaN) features (NaN losses) or labels (an
extra class), a single class, or a column of numbers with a few other cells in
it (it would be dropped as a text column).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fedsim.core.errors import ConfigError
from fedsim.core.experiment import DataConfig


def encode_labels(labels: Sequence[Any] | np.ndarray) -> tuple[np.ndarray, int]:
    """Class indices (sorted class values) and the number of classes."""
    classes, y = np.unique(np.asarray(labels), return_inverse=True)
    return y.astype(np.int64), len(classes)


def labels(values: np.ndarray, source: str, cfg: DataConfig) -> tuple[np.ndarray, int]:
    """Class indices of ``values``; a classifier needs labels on every row and
    at least two classes."""
    missing = _missing(values)
    if missing.any():
        raise ConfigError(
            f"data.label-column: {cfg.label_column!r} of {source} has "
            f"{int(missing.sum())} empty labels (first in row "
            f"{int(missing.argmax())}, 0-based); drop or fill those rows"
        )
    y, num_classes = encode_labels(values)
    if num_classes < 2:
        raise ConfigError(
            f"data.label-column: {cfg.label_column!r} of {source} holds "
            f"{num_classes} class; a classifier needs at least 2"
        )
    return y, num_classes


def _missing(values: np.ndarray) -> np.ndarray:
    """Which cells are missing (None or NaN), for any dtype."""
    import pandas as pd

    return np.asarray(pd.isna(values), dtype=bool)


def _mostly_numeric(values: np.ndarray) -> tuple[bool, int | None]:
    """Whether a non-numeric column has numbers in it (then it is meant as a
    feature), and the row of its first cell that is not one."""
    import pandas as pd

    present = ~_missing(values)
    numbers = pd.to_numeric(pd.Series(values), errors="coerce").notna().to_numpy()
    if not numbers.any():
        return False, None
    bad = present & ~numbers
    return True, int(bad.argmax()) if bad.any() else None


def from_table(
    columns: dict[str, np.ndarray], cfg: DataConfig, source: str
) -> tuple[np.ndarray, np.ndarray, int]:
    """Features and labels of a table: the label column, and every numeric
    column as a feature (a column of text only is skipped).

    Anything a run would train on silently wrong is a :class:`ConfigError`:
    no rows, empty cells in features (NaN losses) or labels (an extra class),
    one class only, and a column of numbers with a few other cells in it
    (it would be dropped).
    """
    if cfg.label_column not in columns:
        raise ConfigError(
            f"data.label-column: {cfg.label_column!r} is not a column of {source}; "
            f"columns: {', '.join(columns)}"
        )
    label = columns[cfg.label_column]
    if len(label) == 0:
        raise ConfigError(f"data.path: {source} has no rows")
    y, num_classes = labels(label, source, cfg)
    features = []
    for name, col in columns.items():
        if name == cfg.label_column:
            continue
        if np.issubdtype(col.dtype, np.number):
            features.append(name)
            continue
        if col.dtype.kind not in "OSU":  # booleans, dates...: not features
            continue
        numeric, row = _mostly_numeric(col)
        if numeric and row is not None:
            raise ConfigError(
                f"data.path: column {name!r} of {source} holds numbers but row "
                f"{row} (0-based) holds {col[row]!r}; fix those cells or drop the "
                "column"
            )
        if numeric:  # numbers and empty cells only: caught as empty below
            features.append(name)
    if not features:
        raise ConfigError(f"data.path: {source} has no numeric feature columns")
    gaps = [n for n in features if _missing(columns[n]).any()]
    if gaps:
        raise ConfigError(
            f"data.path: {source} has empty (NaN) feature values in column(s) "
            f"{', '.join(repr(n) for n in gaps)}; drop or fill those rows"
        )
    x = np.stack([columns[n].astype(np.float32) for n in features], axis=1)
    if not np.isfinite(x).all():
        bad = [n for i, n in enumerate(features) if not np.isfinite(x[:, i]).all()]
        raise ConfigError(
            f"data.path: {source} has infinite feature values in column(s) "
            f"{', '.join(repr(n) for n in bad)}"
        )
    return x, y, num_classes
