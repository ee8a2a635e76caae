"""HeteroFL's aggregation: each parameter entry averaged over the clients that
hold it (pure numpy)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def aggregate_nested(
    current: Mapping[str, np.ndarray], uploads: Sequence[Mapping[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Average every entry over the uploads that hold it.

    Each upload holds, for some parameters, a leading block of the global array
    (``current[k][:a, :b, ...]``, HeteroFL's width slicing). An entry is the
    plain mean of the uploads whose block covers it (the reference code counts
    holders, it does not weight by examples); an entry no upload covers keeps
    its current value.

    Parameters
    ----------
    current : mapping of str to ndarray
        The global model (full size).
    uploads : sequence of mappings of str to ndarray
        The clients' sub-models.

    Returns
    -------
    dict of str to ndarray
        The new global model, in ``current``'s dtypes.
    """
    out: dict[str, np.ndarray] = {}
    for key, glob in current.items():
        total = np.zeros(glob.shape, dtype=np.float64)
        count = np.zeros(glob.shape, dtype=np.int64)
        for up in uploads:
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
            total[index] += part
            count[index] += 1
        new = glob.astype(np.float64)
        held = count > 0
        new[held] = total[held] / count[held]
        out[key] = new.astype(glob.dtype)
    return out
