"""HeteroFL's aggregation: each parameter entry averaged over the clients that
hold it, the head's class rows over the clients that hold the class (pure
numpy)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def aggregate_nested(
    current: Mapping[str, np.ndarray],
    uploads: Sequence[Mapping[str, np.ndarray]],
    rows: Sequence[Mapping[str, Sequence[int]]] | None = None,
) -> dict[str, np.ndarray]:
    """Average every entry over the uploads that hold it.

    Each upload holds, for some parameters, a leading block of the global array
    (``current[k][:a, :b, ...]``, HeteroFL's width slicing). An entry is the
    plain mean of the uploads whose block covers it (the reference code counts
    holders, it does not weight by examples); an entry no upload covers keeps
    its current value. With ``rows``, upload ``m`` holds only the rows (first
    axis) ``rows[m][k]`` of parameter ``k`` (HeteroFL's label split: a head's
    row of a class counts only for the clients that hold the class).

    Parameters
    ----------
    current : mapping of str to ndarray
        The global model (full size).
    uploads : sequence of mappings of str to ndarray
        The clients' sub-models.
    rows : sequence of mappings of str to sequence of int, optional
        Per upload, the rows of each listed parameter it counts for.

    Returns
    -------
    dict of str to ndarray
        The new global model, in ``current``'s dtypes.
    """
    out: dict[str, np.ndarray] = {}
    rows = rows if rows is not None else [{} for _ in uploads]
    for key, glob in current.items():
        total = np.zeros(glob.shape, dtype=np.float64)
        count = np.zeros(glob.shape, dtype=np.int64)
        for up, held_rows in zip(uploads, rows, strict=True):
            if key not in up:
                continue
            part = np.asarray(up[key])
            if part.ndim != glob.ndim or any(
                a > b for a, b in zip(part.shape, glob.shape)
            ):
                raise ValueError(
                    f"{key}: an upload of shape {part.shape} is not a leading block "
                    f"of the global shape {glob.shape}"
                )
            index = tuple(slice(0, s) for s in part.shape)
            weight = np.ones(part.shape, dtype=np.int64)
            if key in held_rows:
                weight[:] = 0
                weight[np.asarray(held_rows[key], dtype=np.int64)] = 1
            total[index] += part * weight
            count[index] += weight
        new = glob.astype(np.float64)
        held = count > 0
        new[held] = total[held] / count[held]
        out[key] = new.astype(glob.dtype)
    return out
