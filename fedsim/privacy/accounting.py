"""Privacy accounting: pure functions over ``(noise_multiplier, sample_rate, steps)``.

Every mechanism in fedsim is a composition of Poisson-subsampled Gaussian
mechanisms, described by a history of ``(noise_multiplier, sample_rate, steps)``
entries exactly as Opacus' accountants keep it. The functions here turn such a
history into an epsilon (Opacus' RDP or PRV analysis), calibrate the noise for a
budget, and reproduce the sampling schedule of Opacus' Poisson data loader. They
hold no state: the client mechanism keeps its history in the client's state, the
server wrapper keeps its own (see :mod:`fedsim.privacy.dp_sgd` and
:mod:`fedsim.privacy.dp_fedavg`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from functools import lru_cache

#: One accountant entry: (noise_multiplier, sample_rate, steps).
Step = tuple[float, float, int]

#: Accountants fedsim can use, by Opacus' mechanism name.
ACCOUNTANTS = ("rdp", "prv")

#: Relative precision of the calibrated epsilon (final epsilon within 1% below).
CALIBRATION_TOLERANCE = 0.01


class BudgetTooSmall(ValueError):
    """No finite noise reaches the requested epsilon."""


def poisson_schedule(num_examples: int, batch_size: int) -> tuple[float, int]:
    """Sample rate and steps per epoch of Opacus' Poisson loader.

    ``PrivacyEngine.make_private(poisson_sampling=True)`` replaces a loader of
    ``ceil(n / batch_size)`` batches by one that samples every example with
    probability ``1 / ceil(n / batch_size)`` for ``int(1 / that)`` steps, and
    accounts every step with sample rate ``1 / steps``. This reproduces those
    numbers (the float round trip makes ``steps`` one less for some ``n``).

    Parameters
    ----------
    num_examples : int
        Size of the local training set (>= 1).
    batch_size : int
        Batch size of the loader before Poisson sampling.

    Returns
    -------
    tuple of (float, int)
        ``(sample_rate, steps_per_epoch)`` as the accountant sees them.
    """
    if num_examples < 1 or batch_size < 1:
        raise ValueError("num_examples and batch_size must be >= 1")
    batches = math.ceil(num_examples / batch_size)
    steps = int(1 / (1 / batches))
    return 1 / steps, steps


def _accountant(name: str, history: Iterable[Step]) -> object:
    from opacus.accountants import create_accountant

    if name not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {name!r}")
    accountant = create_accountant(mechanism=name)
    accountant.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return accountant


def epsilon(history: Sequence[Step], delta: float, accountant: str = "rdp") -> float:
    """Cumulative epsilon at ``delta`` of a composition history.

    Parameters
    ----------
    history : sequence of (noise_multiplier, sample_rate, steps)
        Poisson-subsampled Gaussian mechanisms, composed.
    delta : float
        Target delta, in (0, 1).
    accountant : {"rdp", "prv"}
        Opacus' RDP accountant or its PRV accountant (numerical composition).

    Returns
    -------
    float
        Epsilon; 0 for an empty history, ``inf`` if any entry has no noise.
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    entries = tuple((float(s), float(q), int(n)) for s, q, n in history if int(n) > 0)
    if not entries:
        return 0.0
    if any(s <= 0 for s, _, _ in entries):
        return math.inf
    return _epsilon(entries, float(delta), accountant)


@lru_cache(maxsize=1024)
def _epsilon(entries: tuple[Step, ...], delta: float, accountant: str) -> float:
    # Cached: a client asks for the same history's epsilon from round to round.
    acc = _accountant(accountant, entries)
    with warnings.catch_warnings():
        # Opacus warns when the optimal RDP order is the largest one it tries.
        warnings.simplefilter("ignore", UserWarning)
        return float(acc.get_epsilon(delta))  # type: ignore[attr-defined]


def merge(history: Sequence[Step], step: Step) -> list[Step]:
    """Append ``step`` to ``history``, merging it into an identical last entry.

    Opacus' accountants merge consecutive steps the same way, so a client's
    history stays one entry long while its noise and sample rate do not change.
    """
    out = [(float(s), float(q), int(n)) for s, q, n in history]
    s, q, n = float(step[0]), float(step[1]), int(step[2])
    if n <= 0:
        return out
    if out and out[-1][0] == s and out[-1][1] == q:
        out[-1] = (s, q, out[-1][2] + n)
    else:
        out.append((s, q, n))
    return out


@lru_cache(maxsize=256)
def calibrate_noise(
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    tolerance: float = CALIBRATION_TOLERANCE,
) -> float:
    """Smallest noise multiplier (up to ``tolerance``) whose epsilon after
    ``steps`` Poisson-subsampled Gaussian steps is <= ``target_epsilon``.

    The result satisfies ``(1 - tolerance) * target <= epsilon <= target`` with
    the same accountant that :func:`epsilon` uses, so a run planned for
    ``steps`` steps ends just under its budget.

    Raises
    ------
    BudgetTooSmall
        If even a noise multiplier of 1e6 spends more than ``target_epsilon``.
    """
    if target_epsilon <= 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")

    def spent(sigma: float) -> float:
        return epsilon([(sigma, sample_rate, steps)], target_delta, accountant)

    low, high = 0.0, 1.0
    while spent(high) > target_epsilon:
        low, high = high, 2 * high
        if high > 1e6:
            raise BudgetTooSmall(
                f"epsilon {target_epsilon:g} at delta {target_delta:g} cannot be "
                f"reached in {steps} steps at sample rate {sample_rate:g}"
            )
    # Invariant: spent(high) <= target < spent(low) (spent(0) is infinite).
    while spent(high) < (1 - tolerance) * target_epsilon and high - low > 1e-9:
        mid = (low + high) / 2
        if spent(mid) <= target_epsilon:
            high = mid
        else:
            low = mid
    return high


def planned_steps(
    num_examples: int, batch_size: int, epochs: int, rounds: int
) -> tuple[float, int, int]:
    """DP-SGD schedule of one client over a whole run.

    Returns
    -------
    tuple of (float, int, int)
        ``(sample_rate, steps_per_round, steps_per_run)`` where a round is
        ``epochs`` passes of :func:`poisson_schedule` steps and the run is
        ``rounds`` rounds (every round the client may be sampled in).
    """
    sample_rate, per_epoch = poisson_schedule(num_examples, batch_size)
    per_round = epochs * per_epoch
    return sample_rate, per_round, rounds * per_round


#: Sensitivity of the unclipped count by release: each client adds its bit
#: ``b`` (uncentred) or ``b - 1/2`` (centred, Andrew et al. / TF-Privacy).
COUNT_SENSITIVITY = {"centred": 0.5, "uncentred": 1.0}


def adaptive_update_noise(
    noise_multiplier: float, count_stddev: float, count_release: str = "uncentred"
) -> float:
    """Noise multiplier for the clipped updates under adaptive clipping.

    Adaptive clipping (Andrew et al., 2021) releases two Gaussian sums per round:
    the clipped updates (sensitivity ``clipping_norm``, noise multiplier ``z_u``)
    and the count of unclipped updates (noise std ``count_stddev``, sensitivity
    ``s``: 1 for the bits ``b``, 1/2 for the centred bits ``b - 1/2``). Together
    they are one Gaussian mechanism with noise multiplier ``(z_u**-2 +
    (count_stddev / s)**-2) ** -0.5``; this returns the ``z_u`` that makes that
    equal to ``noise_multiplier``: ``(z**-2 - (count_stddev / s)**-2) ** -0.5``
    (centred: Andrew et al.'s ``(z**-2 - (2 sigma_b)**-2) ** -0.5``).

    Raises
    ------
    ValueError
        Unless ``0 < noise_multiplier < count_stddev / s``.
    """
    scaled = count_stddev / COUNT_SENSITIVITY[count_release]
    if not 0 < noise_multiplier < scaled:
        raise ValueError(
            f"noise_multiplier ({noise_multiplier:g}) must be in "
            f"(0, count_stddev / sensitivity = {scaled:g})"
        )
    return float((noise_multiplier**-2 - scaled**-2) ** -0.5)
