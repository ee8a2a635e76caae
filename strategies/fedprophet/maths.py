"""FedProphet's server-side rules as pure functions: masked averaging, the
intermediate-feature epsilon, Adaptive Perturbation Adjustment and its
schedule, Differentiated
Module Assignment, the stage-advance test."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


def masked_average(
    current: Mapping[str, np.ndarray],
    uploads: Sequence[tuple[Mapping[str, np.ndarray], float]],
) -> dict[str, np.ndarray]:
    """Each array: the weighted mean over the uploads that carry it (the clients
    that trained its module); arrays no upload carries keep their value.

    Parameters
    ----------
    current : mapping of str to ndarray
        The server's arrays.
    uploads : sequence of (arrays, weight)
        Each client's trained arrays and its weight (examples).
    """
    out: dict[str, np.ndarray] = {}
    for key, value in current.items():
        held = [(up[key], w) for up, w in uploads if key in up]
        total = sum(w for _, w in held)
        if not held or total <= 0:
            out[key] = value
            continue
        mean = sum(np.asarray(a, dtype=np.float64) * w for a, w in held) / total
        out[key] = np.asarray(mean, dtype=value.dtype)
    return out


def feature_epsilon(perturbations: Sequence[float], dim: int) -> float:
    """The L-inf radius for the next stage's inputs from the L2 norms of the
    feature perturbations adversarial inputs caused (the reference's
    ``int_adv_norm = inf``): ``sqrt(mean^2 / dim)``."""
    mean = float(np.mean(perturbations))
    return math.sqrt(mean**2 / dim)


def adjust_alpha(
    alpha: float, ratios: Sequence[float], last_stage_ratio: float, floor: float
) -> float:
    """Adaptive Perturbation Adjustment: the mean clean/robust accuracy ratio of
    the last five evaluations against the previous stage's; +0.1 when robust
    accuracy fell behind (ratio > 1.05 x), -0.1 (not below ``floor``) when
    clean accuracy did (ratio < 0.95 x)."""
    if not ratios:
        return alpha
    recent = float(np.mean(ratios[-5:]))
    if recent > 1.05 * last_stage_ratio:
        return alpha + 0.1
    if recent < 0.95 * last_stage_ratio:
        return max(floor, alpha - 0.1)
    return alpha


def apa_due(round_in_stage: int, rounds_per_stage: int) -> bool:
    """Whether APA adjusts ``alpha`` after the stage's ``round_in_stage``-th
    round (1-based): the reference's schedule (``module_scheduler.py``), past
    the first ``int(0.05 * rounds_per_stage)`` rounds, every
    ``int(0.1 * rounds_per_stage)`` rounds (at least every round: the
    reference's period is 0, a division by zero, below 10 rounds a stage)."""
    period = max(1, int(0.1 * rounds_per_stage))
    return (
        round_in_stage > int(0.05 * rounds_per_stage) and round_in_stage % period == 0
    )


def prophet_modules(stage: int, memory: Sequence[int], budget: float) -> int:
    """Differentiated Module Assignment: how many modules after ``stage`` a
    client with ``budget`` bytes also trains (while the running total fits)."""
    total, extra = memory[stage], 0
    for nxt in range(stage + 1, len(memory)):
        total += memory[nxt]
        if total > budget:
            break
        extra += 1
    return extra


def should_advance(
    rounds_in_stage: int, rounds_per_stage: int, since_best: int, patience: int
) -> bool:
    """The stage ends after its share of rounds, or when its score has not
    improved for ``patience`` evaluations."""
    return rounds_in_stage >= rounds_per_stage or since_best >= patience
