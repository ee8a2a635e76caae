"""FedAvg's aggregation, pure numpy."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def weighted_mean(
    arrays: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]
) -> dict[str, np.ndarray]:
    """The ``weights``-weighted mean of each array over the clients,
    accumulated in float64 and returned in the dtype the clients sent it in
    (float16 arrays of a float16 model stay float16 on the wire, but are never
    summed in float16; integer buffers are rounded back)."""
    total = float(sum(weights))
    p = [float(w) / total for w in weights]
    out: dict[str, np.ndarray] = {}
    for key, first in arrays[0].items():
        mean = sum(
            pk * np.asarray(a[key], dtype=np.float64) for pk, a in zip(p, arrays)
        )
        mean = np.asarray(mean)
        if not np.issubdtype(first.dtype, np.floating):
            mean = np.rint(mean)
        out[key] = mean.astype(first.dtype)
    return out
