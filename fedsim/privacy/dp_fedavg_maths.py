"""DP-FedAvg's release, as pure functions over numpy arrays.

One round of DP-FedAvg (McMahan et al., 2018) with adaptive clipping (Andrew et
al., 2021) releases

- the new global model ``current + (sum_i clip(update_i, C) + N(0, (z C)^2 I)) / D``,
  where ``D`` is fixed before the round: the number of clients sampled
  (fixed-size sampling) or its expectation ``q N`` (Poisson sampling), never the
  number of replies that came back, so one client moves the sum by at most
  ``C`` and the noise is ``z`` times that whatever the replies;
- with adaptive clipping, the fraction of updates left unclipped,
  ``(sum_i (b_i - 1/2) + N(0, sigma_b^2)) / D + 1/2`` with ``b_i = 1[|update_i|
  <= C]`` (centred, sensitivity 1/2; or uncentred ``(sum_i b_i + N(0,
  sigma_b^2)) / D``, sensitivity 1), clamped to ``[0, 1]``, which moves the
  norm geometrically towards the target quantile.

The functions here compute those pieces; the strategy wrappers in
:mod:`fedsim.privacy.dp_fedavg` feed them messages. Randomness comes from a
``numpy.random.Generator`` passed in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Arrays = Sequence[np.ndarray]


def noise_stddev(
    noise_multiplier: float, clipping_norm: float, denominator: float
) -> float:
    """Std of the noise on the mean:
    ``noise_multiplier * clipping_norm / denominator``."""
    if denominator <= 0:
        raise ValueError(f"denominator must be > 0, got {denominator}")
    return noise_multiplier * clipping_norm / denominator


def fixed_denominator_mean(
    current: Arrays, models: Sequence[Arrays], denominator: float
) -> list[np.ndarray]:
    """``current + sum_i (models_i - current) / denominator``.

    The mean of the (clipped) client models with a denominator fixed before the
    round: a client that did not reply contributes a zero update. With no
    models this is ``current``. Arrays keep the dtype of ``current`` (float32
    stays float32; integer arrays become float64, as in FedAvg).

    Parameters
    ----------
    current : sequence of ndarray
        The global model the round started from.
    models : sequence of sequence of ndarray
        The clients' models after clipping (same layout as ``current``).
    denominator : float
        Clients the round is calibrated for (> 0).
    """
    if denominator <= 0:
        raise ValueError(f"denominator must be > 0, got {denominator}")
    out = []
    for i, base in enumerate(current):
        total = np.zeros(base.shape, dtype=np.float64)
        for model in models:
            total += np.subtract(model[i], base, dtype=np.float64)
        dtype = np.result_type(base.dtype, np.float32)
        out.append((base + total / denominator).astype(dtype))
    return out


def add_noise(
    arrays: Arrays, stddev: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """``arrays`` plus independent ``N(0, stddev^2)`` noise on every element
    (drawn array by array, in order; cast to each array's dtype)."""
    return [
        (a + rng.normal(0.0, stddev, np.shape(a))).astype(np.asarray(a).dtype)
        for a in arrays
    ]


def noisy_unclipped_fraction(
    unclipped: int,
    count_stddev: float,
    denominator: float,
    rng: np.random.Generator,
    *,
    replies: int | None = None,
) -> float:
    """Noisy share of updates the norm left unclipped, clamped to ``[0, 1]``.

    Uncentred (``replies`` None): ``(unclipped + N(0, count_stddev^2)) /
    denominator`` (Andrew et al., Algorithm 1, with the fixed denominator).
    Centred (``replies``: the clients counted): each adds ``b - 1/2``, so
    ``(unclipped - replies / 2 + N(0, count_stddev^2)) / denominator + 1/2``
    (TF-Privacy's ``QuantileEstimatorQuery``; sensitivity 1/2). Clamped as
    TF-Privacy's quantile estimator does: the noise can push it outside
    ``[0, 1]``, and an unclamped value would move the norm further than any
    real fraction can.
    """
    if denominator <= 0:
        raise ValueError(f"denominator must be > 0, got {denominator}")
    noise = float(rng.normal(0.0, count_stddev))
    if replies is None:
        noisy = (unclipped + noise) / denominator
    else:
        noisy = (unclipped - replies / 2 + noise) / denominator + 0.5
    return min(max(noisy, 0.0), 1.0)


def next_clipping_norm(
    clipping_norm: float,
    unclipped_fraction: float,
    target_unclipped_quantile: float,
    lr: float,
) -> float:
    """Andrew et al.'s geometric update:
    ``clipping_norm * exp(-lr * (unclipped_fraction - target_unclipped_quantile))``.

    More updates unclipped than the target shrinks the norm, fewer grows it.
    """
    return clipping_norm * math.exp(
        -lr * (unclipped_fraction - target_unclipped_quantile)
    )


def adaptive_noise_ratio(
    noise_multiplier: float, count_stddev: float, sensitivity: float = 1.0
) -> float:
    """How much more noise the updates get than the accounted noise multiplier
    when the count (of ``sensitivity`` 1, or 1/2 centred) shares it: ``z_u / z
    = (1 - (z s / sigma_b)^2)^-1/2`` (see
    :func:`fedsim.privacy.accounting.adaptive_update_noise`)."""
    scaled = count_stddev / sensitivity
    if not 0 < noise_multiplier < scaled:
        raise ValueError(
            f"noise_multiplier ({noise_multiplier:g}) must be in "
            f"(0, count_stddev / sensitivity = {scaled:g})"
        )
    return float((1 - (noise_multiplier / scaled) ** 2) ** -0.5)


def poisson_sample(
    size: int, sample_rate: float, rng: np.random.Generator
) -> np.ndarray:
    """Indices of ``size`` items, each kept independently with ``sample_rate``."""
    if not 0 <= sample_rate <= 1:
        raise ValueError(f"sample_rate must be in [0, 1], got {sample_rate}")
    return np.flatnonzero(rng.random(size) < sample_rate)
