"""Split learning's aggregation and serving order: pure functions over numpy."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def weighted_average(
    states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]
) -> dict[str, np.ndarray]:
    """``sum_k w_k * state_k / sum_k w_k`` per array (FedAvg), in float64, cast
    back to each array's dtype.

    Raises
    ------
    ValueError
        Without states, with weights that do not sum to a positive number, or
        with states whose names differ.
    """
    if not states or len(states) != len(weights):
        raise ValueError("one weight per state, at least one state")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights must sum to > 0, got {total}")
    names = set(states[0])
    if any(set(s) != names for s in states[1:]):
        raise ValueError("states hold different arrays")
    out = {}
    for name in states[0]:
        acc = sum(
            (w / total) * np.asarray(s[name], dtype=np.float64)
            for s, w in zip(states, weights, strict=True)
        )
        out[name] = np.asarray(acc).astype(np.asarray(states[0][name]).dtype)
    return out


def serving_order(nodes: Sequence[int], seed: int) -> list[int]:
    """SplitFed V2's order of the clients in a round: a permutation of ``nodes``
    (given in a stable order, e.g. by partition) drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    return [nodes[i] for i in rng.permutation(len(nodes))]
