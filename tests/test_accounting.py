"""Privacy accounting formulas against Opacus' own loader and accountants."""

from __future__ import annotations

import math

import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.data_loader import DPDataLoader
from torch.utils.data import DataLoader, TensorDataset

from fedsim.privacy import accounting


@pytest.mark.parametrize(
    ("n", "batch_size"),
    [(1, 32), (31, 32), (32, 32), (426, 16), (93 * 4, 4), (1000, 7)],
)
def test_poisson_schedule_matches_opacus_loader(n: int, batch_size: int) -> None:
    loader = DataLoader(TensorDataset(torch.zeros(n, 1)), batch_size=batch_size)
    private = DPDataLoader.from_data_loader(loader)
    sample_rate, steps = accounting.poisson_schedule(n, batch_size)
    assert steps == len(private)
    # make_private accounts every step at 1 / len(private loader)
    assert sample_rate == 1 / len(private)


def test_poisson_schedule_float_round_trip() -> None:
    # ceil(372 / 4) = 93 batches, but int(1 / (1 / 93)) = 92 steps in Opacus
    assert accounting.poisson_schedule(93 * 4, 4) == (1 / 92, 92)


def test_epsilon_equals_opacus_rdp_accountant() -> None:
    history = [(1.1, 0.04, 75), (0.9, 0.05, 40), (1.1, 0.04, 25)]
    acc = RDPAccountant()
    acc.history = list(history)
    assert accounting.epsilon(history, 1e-5, "rdp") == pytest.approx(
        acc.get_epsilon(1e-5), abs=1e-9
    )
    # and the RDP analysis by hand: sum of per-entry RDP curves, then conversion
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = sum(
        rdp_analysis.compute_rdp(q=q, noise_multiplier=s, steps=n, orders=orders)
        for s, q, n in history
    )
    eps, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)
    assert accounting.epsilon(history, 1e-5) == pytest.approx(eps, abs=1e-9)


def test_epsilon_edge_cases() -> None:
    assert accounting.epsilon([], 1e-5) == 0.0
    assert accounting.epsilon([(1.0, 0.1, 0)], 1e-5) == 0.0
    assert accounting.epsilon([(0.0, 0.1, 3)], 1e-5) == math.inf
    with pytest.raises(ValueError):
        accounting.epsilon([(1.0, 0.1, 3)], 1.0)


def test_prv_is_tighter_than_rdp() -> None:
    history = [(1.0, 0.05, 200)]
    prv = accounting.epsilon(history, 1e-5, "prv")
    rdp = accounting.epsilon(history, 1e-5, "rdp")
    assert 0 < prv < rdp


def test_merge_follows_opacus_step() -> None:
    steps = [(1.0, 0.1)] * 3 + [(0.5, 0.1)] * 2 + [(1.0, 0.1)]
    acc = RDPAccountant()
    for sigma, q in steps:
        acc.step(noise_multiplier=sigma, sample_rate=q)
    merged: list[accounting.Step] = []
    for sigma, q in steps:
        merged = accounting.merge(merged, (sigma, q, 1))
    assert merged == acc.history
    assert accounting.merge(merged, (1.0, 0.1, 0)) == merged


@pytest.mark.parametrize(
    ("target", "q", "steps", "name"),
    [
        (1.0, 0.05, 300, "rdp"),
        (8.0, 0.25, 24, "rdp"),
        (3.0, 1.0, 5, "rdp"),
        (2.0, 0.05, 300, "prv"),
    ],
)
def test_calibrate_noise_lands_just_under_target(
    target: float, q: float, steps: int, name: str
) -> None:
    sigma = accounting.calibrate_noise(target, 1e-5, q, steps, name)
    spent = accounting.epsilon([(sigma, q, steps)], 1e-5, name)
    assert spent <= target
    assert spent >= (1 - accounting.CALIBRATION_TOLERANCE) * target
    # less noise would overspend
    assert accounting.epsilon([(sigma * 0.97, q, steps)], 1e-5, name) > spent


def test_calibrate_noise_rejects_unreachable_budget() -> None:
    with pytest.raises(accounting.BudgetTooSmall):
        accounting.calibrate_noise(1e-9, 1e-5, 1.0, 10_000)


def test_planned_steps() -> None:
    q, per_round, per_run = accounting.planned_steps(100, 32, epochs=2, rounds=5)
    assert (q, per_round, per_run) == (0.25, 8, 40)


def test_adaptive_update_noise_composes_back_to_the_target() -> None:
    z_u = accounting.adaptive_update_noise(0.8, 2.0)
    assert (z_u**-2 + 2.0**-2) ** -0.5 == pytest.approx(0.8)
    assert z_u > 0.8
    with pytest.raises(ValueError):
        accounting.adaptive_update_noise(2.0, 2.0)
    # centred bits (sensitivity 1/2): the count's multiplier is 2 sigma_b
    centred = accounting.adaptive_update_noise(0.8, 2.0, "centred")
    assert centred == pytest.approx((0.8**-2 - 4.0**-2) ** -0.5)
    assert 0.8 < centred < z_u
    assert accounting.adaptive_update_noise(3.0, 2.0, "centred") > 3.0
