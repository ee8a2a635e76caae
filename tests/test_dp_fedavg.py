"""DP-FedAvg's server chain against numpy oracles, Opacus' accountant and
statistical tests with fixed seeds (every tolerance is stated with its margin)."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from opacus.accountants import RDPAccountant

from fedsim import privacy
from fedsim.core.errors import ConfigError
from fedsim.core.experiment import Experiment
from fedsim.core.loading import load_experiment
from fedsim.core.messages import ARRAYS, CONFIG, NUM_EXAMPLES
from fedsim.engine.server.run_recorder import RunRecorder
from fedsim.privacy import base as pbase
from fedsim.privacy import dp_fedavg
from fedsim.privacy import dp_fedavg_maths as maths
from fedsim.privacy import dp_fedavg_wrappers as wrappers
from tests.conftest import reply, strategy_for

SIZE = 50_000  # parameters of the stand-in model: enough for a sharp std estimate


def experiment(*overrides: str) -> Experiment:
    return load_experiment(
        None,
        [
            "model.name=mlp",
            "model.hidden=16",
            "rounds=3",
            "federation.clients=8",
            "federation.fraction-train=0.5",
            "privacy.mechanism=dp-fedavg",
            *overrides,
        ],
    )


class FakeGrid:
    """Just what FedAvg's sampling asks a grid: the connected node ids."""

    def __init__(self, nodes: int):
        self.nodes = list(range(1, nodes + 1))

    def get_node_ids(self) -> list[int]:
        return self.nodes


def grid(nodes: int) -> Grid:
    """A :class:`FakeGrid` of ``nodes`` nodes, typed as the Grid it stands for."""
    return cast(Grid, FakeGrid(nodes))


class RecordingRng:
    """A numpy Generator that records every normal draw (intercepts the noise)."""

    def __init__(self, seed: int, shift: float | None = None):
        self.rng = np.random.default_rng(seed)
        self.shift = shift  # returned for every scalar draw (an extreme count)
        self.draws: list[tuple[float, Any, Any]] = []

    def normal(self, loc: float = 0.0, scale: float = 1.0, size: Any = None) -> Any:
        if size is None and self.shift is not None:
            value: Any = self.shift
        else:
            value = self.rng.normal(loc, scale, size)
        self.draws.append((scale, size, value))
        return value

    def random(self, size: Any = None) -> Any:
        return self.rng.random(size)

    def arrays(self) -> list[tuple[float, np.ndarray]]:
        return [(s, v) for s, size, v in self.draws if size is not None]

    def scalars(self) -> list[tuple[float, float]]:
        return [(s, v) for s, size, v in self.draws if size is None]


def chain(exp: Experiment, rng: RecordingRng) -> dp_fedavg.DpFedAvgAccounting:
    """The strategy the ServerApp runs for ``exp``, drawing noise from ``rng``."""
    strategy = privacy.wrap_strategy(strategy_for(exp), exp)
    assert isinstance(strategy, dp_fedavg.DpFedAvgAccounting)
    strategy.strategy.rng = rng
    return strategy


def start_round(strategy: Any, rnd: int, current: np.ndarray, nodes: int) -> list[int]:
    """``configure_train`` of round ``rnd``; returns the node ids sampled."""
    arrays = ArrayRecord({"w": Array(current)})
    messages = strategy.configure_train(rnd, arrays, ConfigRecord(), grid(nodes))
    return [m.metadata.dst_node_id for m in messages]


def replies_for(updates: Iterable[np.ndarray | None], current: np.ndarray) -> list:
    """Train replies with ``current + update`` (None: the client failed)."""
    return [
        reply(None, {}, i + 1, error="dropped out")
        if u is None
        else reply({"w": current + u}, {NUM_EXAMPLES: 10, "loss": 1.0}, i + 1)
        for i, u in enumerate(updates)
    ]


def clip(update: np.ndarray, norm: float) -> np.ndarray:
    """Oracle: scale ``update`` to L2 norm at most ``norm`` (in float64)."""
    u = update.astype(np.float64)
    length = np.linalg.norm(u)
    return u if length <= norm else u * (norm / length)


def rdp(sigma: float, q: float, steps: int) -> float:
    oracle = RDPAccountant()
    for _ in range(steps):
        oracle.step(noise_multiplier=sigma, sample_rate=q)
    return float(oracle.get_epsilon(1e-5))


@pytest.fixture
def updates() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    # norms about 4.5, 0.45, 2.2: the first and last are clipped to 1
    return [
        rng.normal(0, s / math.sqrt(SIZE), SIZE).astype(np.float32)
        for s in (4.5, 0.45, 2.2)
    ]


def test_chain_clips_averages_uniformly_and_accounts(task_identity: None) -> None:
    """Without its (intercepted) noise, the new model is the global one plus
    the uniform mean of the updates clipped to clipping-norm, whatever their
    examples (numpy oracle); the round is accounted at q = 2 / 4."""
    exp = experiment(
        "federation.clients=4",
        "privacy.noise-multiplier=1.0",
        "privacy.clipping-norm=0.5",
    )
    noise = RecordingRng(0)
    strategy = chain(exp, noise)
    rng = np.random.default_rng(0)
    current = rng.normal(size=(3, 2)).astype(np.float32)
    assert len(start_round(strategy, 1, current, 4)) == 2
    ups = [rng.normal(scale=s, size=(3, 2)).astype(np.float32) for s in (0.05, 2.0)]
    replies = [
        reply({"w": current + u}, {NUM_EXAMPLES: n, "loss": 1.0}, i + 1)
        for i, (u, n) in enumerate(zip(ups, (10, 90)))
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    ((scale, drawn),) = noise.arrays()
    assert scale == pytest.approx(1.0 * 0.5 / 2)
    np.testing.assert_allclose(
        arrays["w"].numpy() - drawn,
        current + np.mean([clip(u, 0.5) for u in ups], axis=0),
        atol=1e-6,
    )
    assert metrics[pbase.EPSILON] == pytest.approx(rdp(1.0, 0.5, 1), abs=1e-9)
    assert metrics[pbase.CLIPPING_NORM] == 0.5


# -- 1. a short reply set gets the noise the accountant assumed ------------------


def adaptive_only(clipping: str, *overrides: str) -> tuple[str, ...]:
    """Keys read only by adaptive clipping (refused with fixed clipping)."""
    return overrides if clipping == "adaptive" else ()


@pytest.mark.parametrize(
    ("clipping", "release"),
    [("fixed", "centred"), ("adaptive", "uncentred"), ("adaptive", "centred")],
)
def test_round_with_a_failed_client_has_the_accounted_noise(
    task_identity: None, updates: list[np.ndarray], clipping: str, release: str
) -> None:
    """4 clients sampled of 8, one fails: the release is
    ``current + sum(clipped) / 4`` plus noise of std ``z_u C / 4`` (z_u = z for
    fixed clipping; for adaptive, updates and count together make z: the count
    has sensitivity 1 uncentred, 1/2 centred), measured on the intercepted
    draw, and the round is accounted at (z, q = 0.5)."""
    sigma, norm = (1.0, 1.0) if clipping == "fixed" else (0.5, 1.0)
    exp = experiment(
        f"privacy.noise-multiplier={sigma}",
        f"privacy.clipping='{clipping}'",
        *adaptive_only(
            clipping,
            "privacy.clipped-count-stddev=1.0",
            f"privacy.count-release='{release}'",
        ),
    )
    sensitivity = 0.5 if release == "centred" else 1.0
    rng = RecordingRng(1)
    strategy = chain(exp, rng)
    current = np.random.default_rng(2).normal(size=SIZE).astype(np.float32)
    assert len(start_round(strategy, 1, current, 8)) == 4
    arrays, metrics = strategy.aggregate_train(
        1, replies_for([*updates, None], current)
    )
    assert arrays is not None and metrics is not None

    ((scale, noise),) = rng.arrays()
    z_u = (
        sigma
        if clipping == "fixed"
        else (sigma**-2 - (1.0 / sensitivity) ** -2) ** -0.5
    )
    assert scale == pytest.approx(z_u * norm / 4, rel=1e-12)
    # the draw itself: sample std of 50 000 normals is within 0.32% (1 s.e.)
    # of the truth, so 2% is a 6 s.e. margin
    assert np.std(noise) == pytest.approx(z_u * norm / 4, rel=0.02)
    # what the noise was added to: the sum of clipped updates over 4, not 3
    expected = current + sum(clip(u, norm) for u in updates) / 4
    np.testing.assert_allclose(arrays["w"].numpy() - noise, expected, atol=1e-5)
    if clipping == "adaptive":
        ((count_scale, _),) = rng.scalars()
        assert count_scale == 1.0
        assert (z_u**-2 + (count_scale / sensitivity) ** -2) ** -0.5 == (
            pytest.approx(sigma)
        )
    assert metrics[pbase.NOISE_MULTIPLIER] == sigma
    assert metrics[pbase.EPSILON] == pytest.approx(rdp(sigma, 0.5, 1), abs=1e-9)


def test_fixed_denominator_mean_against_numpy() -> None:
    rng = np.random.default_rng(0)
    current: list[np.ndarray] = [
        rng.normal(size=(3, 2)).astype(np.float32),
        np.arange(4),
    ]
    models: list[list[np.ndarray]] = [
        [rng.normal(size=(3, 2)).astype(np.float32), rng.integers(0, 9, 4)]
        for _ in range(3)
    ]
    out = maths.fixed_denominator_mean(current, models, 2.5)
    for i in range(2):
        base = current[i].astype(np.float64)
        oracle = base + sum(m[i] - base for m in models) / 2.5
        np.testing.assert_allclose(out[i], oracle, rtol=1e-6)
    assert out[0].dtype == np.float32 and out[1].dtype == np.float64
    same = maths.fixed_denominator_mean(current, [], 4)
    np.testing.assert_array_equal(same[0], current[0])


# -- 2. zero updates and empty rounds do not end the run ------------------------


@pytest.mark.parametrize("clipping", ["fixed", "adaptive"])
def test_zero_updates_and_empty_rounds_are_released_and_accounted(
    task_identity: None, updates: list[np.ndarray], clipping: str
) -> None:
    """A client whose model comes back unchanged (Flower's clipping would
    divide by its norm) contributes 0 and, with adaptive clipping, counts as
    unclipped; a round with no reply at all releases noise only and is
    accounted like any other."""
    exp = experiment(
        "privacy.noise-multiplier=0.5",
        f"privacy.clipping='{clipping}'",
        *adaptive_only(clipping, "privacy.clipped-count-stddev=1.0"),
    )
    rng = RecordingRng(3, shift=0.25)
    strategy = chain(exp, rng)
    current = np.linspace(-1, 1, SIZE, dtype=np.float32)
    zero = np.zeros(SIZE, dtype=np.float32)
    start_round(strategy, 1, current, 8)
    arrays, _ = strategy.aggregate_train(
        1, replies_for([updates[0], zero, updates[1], zero], current)
    )
    assert arrays is not None
    ((_, noise),) = rng.arrays()
    expected = current + (clip(updates[0], 1.0) + clip(updates[1], 1.0)) / 4
    np.testing.assert_allclose(arrays["w"].numpy() - noise, expected, atol=1e-5)
    if clipping == "adaptive":
        # updates[1] and both zero updates are unclipped: (3 + 0.25) / 4
        wrapper = strategy.strategy
        assert wrapper.clipping_norm == pytest.approx(
            1.0 * math.exp(-0.2 * ((3 + 0.25) / 4 - 0.5)), rel=1e-12
        )

    rng.draws.clear()
    start_round(strategy, 2, current, 8)
    arrays, metrics = strategy.aggregate_train(2, [])
    assert arrays is not None and metrics is not None
    ((scale, noise),) = rng.arrays()
    np.testing.assert_allclose(arrays["w"].numpy() - noise, current, atol=1e-6)
    assert scale > 0
    assert metrics[pbase.EPSILON] == pytest.approx(rdp(0.5, 0.5, 2), abs=1e-9)


# -- 3. the noisy unclipped fraction is clamped ----------------------------------


@pytest.mark.parametrize(("shift", "clamped"), [(50.0, 1.0), (-50.0, 0.0)])
def test_noisy_fraction_is_clamped_to_the_unit_interval(
    task_identity: None, shift: float, clamped: float
) -> None:
    fake = RecordingRng(0, shift=shift)
    unclamped = (3 + shift) / 4
    assert not 0 <= unclamped <= 1
    assert maths.noisy_unclipped_fraction(3, 1.0, 4, fake) == clamped  # type: ignore[arg-type]

    exp = experiment(
        "privacy.noise-multiplier=0.5",
        "privacy.clipping='adaptive'",
        "privacy.clipped-count-stddev=1.0",
        "privacy.clipping-norm=2.0",
    )
    strategy = chain(exp, RecordingRng(0, shift=shift))
    current = np.zeros(8, dtype=np.float32)
    start_round(strategy, 1, current, 8)
    small = [np.full(8, 0.1, dtype=np.float32)] * 4  # all four unclipped
    strategy.aggregate_train(1, replies_for(small, current))
    assert strategy.strategy.clipping_norm == pytest.approx(
        2.0 * math.exp(-0.2 * (clamped - 0.5)), rel=1e-12
    )


# -- 4. the aggregate is noised with the norm that clipped it --------------------


def test_adaptive_noise_uses_the_norm_that_clipped_the_round(
    task_identity: None,
) -> None:
    """Every update is far above the norm (nothing unclipped): round 1 clips
    and noises with C0, the norm then grows to C1 = C0 exp(-lr (b - target)),
    and round 2 clips and noises with C1 (Flower 1.41 noised round 1 with C1)."""
    exp = experiment(
        "privacy.noise-multiplier=0.5",
        "privacy.clipping='adaptive'",
        "privacy.clipped-count-stddev=1.0",
        "privacy.clipping-norm=0.1",
        "privacy.count-release='uncentred'",
    )
    rng = RecordingRng(5)
    strategy = chain(exp, rng)
    z_u = strategy.strategy.noise_multiplier
    assert (z_u**-2 + 1.0) ** -0.5 == pytest.approx(0.5)
    current = np.zeros(SIZE, dtype=np.float32)
    big = [np.full(SIZE, 5.0, dtype=np.float32)] * 4
    norm = 0.1
    for rnd in (1, 2):
        rng.draws.clear()
        start_round(strategy, rnd, current, 8)
        arrays, metrics = strategy.aggregate_train(rnd, replies_for(big, current))
        assert arrays is not None and metrics is not None
        assert metrics[pbase.CLIPPING_NORM] == pytest.approx(norm, rel=1e-12)
        ((scale, noise),) = rng.arrays()
        assert scale == pytest.approx(z_u * norm / 4, rel=1e-12)
        # clipped with the same norm: the four equal updates clipped to it
        np.testing.assert_allclose(
            arrays["w"].numpy() - noise, clip(big[0], norm), rtol=1e-5
        )
        ((_, count_noise),) = rng.scalars()
        unclipped = min(max(count_noise / 4, 0.0), 1.0)
        following = norm * math.exp(-0.2 * (unclipped - 0.5))
        assert following != pytest.approx(norm, rel=1e-3)  # the test can tell
        norm = following
    assert strategy.strategy.clipping_norm == pytest.approx(norm, rel=1e-12)


# -- 5. Poisson client sampling and what the accounting is -----------------------


def test_poisson_sampling_joins_each_client_with_probability_q(
    task_identity: None,
) -> None:
    """20 clients, q = 0.3, 500 rounds. The participation rate has standard
    error sqrt(0.21 / 10 000) = 0.0046: a 0.015 tolerance is 3.3 s.e.; each
    client's rate has s.e. 0.020 over 500 rounds, tolerance 0.08 (4 s.e.). The
    number per round varies like Binomial(20, 0.3) (variance 4.2, s.e. of the
    sample variance about 0.27; tolerance 1.0), where fixed-size sampling has
    variance 0."""
    nodes, q, rounds = 20, 0.3, 500
    inner = FedAvg(fraction_train=q, min_available_nodes=nodes)
    sampler = wrappers.PoissonSampling(inner, sample_rate=q, seed=11)
    arrays = ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})
    joined = np.zeros((rounds, nodes), dtype=bool)
    for rnd in range(1, rounds + 1):
        messages = list(
            sampler.configure_train(rnd, arrays, ConfigRecord(), grid(nodes))
        )
        dst = [m.metadata.dst_node_id for m in messages]
        assert len(set(dst)) == len(dst)
        assert all(m.content[ARRAYS] is arrays for m in messages)
        assert all(m.content[CONFIG]["server-round"] == rnd for m in messages)
        joined[rnd - 1, [d - 1 for d in dst]] = True
    assert joined.mean() == pytest.approx(q, abs=0.015)
    assert np.all(np.abs(joined.mean(axis=0) - q) < 0.08)
    assert np.var(joined.sum(axis=1), ddof=1) == pytest.approx(
        nodes * q * (1 - q), abs=1.0
    )
    # the draw depends on the seed and the round alone
    again = wrappers.PoissonSampling(inner, sample_rate=q, seed=11)
    first = again.configure_train(1, arrays, ConfigRecord(), grid(nodes))
    assert [m.metadata.dst_node_id - 1 for m in first] == list(
        np.flatnonzero(joined[0])
    )


def test_poisson_rounds_are_accounted_at_q_with_denominator_q_n(
    task_identity: None,
) -> None:
    """10 clients, fraction-train 0.25: fixed-size sampling would take 2
    clients (q = 0.2); Poisson sampling is accounted at q = 0.25 exactly, the
    noise on the mean is z C / 2.5, and epsilon is Opacus' RDP accountant's
    after r steps at (z, 0.25)."""
    exp = experiment(
        "federation.clients=10",
        "federation.fraction-train=0.25",
        "privacy.client-sampling='poisson'",
        "privacy.noise-multiplier=1.0",
        "privacy.clipping-norm=0.5",
    )
    rng = RecordingRng(0)
    strategy = chain(exp, rng)
    assert strategy.sample_rate == 0.25
    assert dp_fedavg.accounting_label(exp) == "poisson"
    current = np.zeros(6, dtype=np.float32)
    sizes = []
    for rnd in (1, 2, 3):
        rng.draws.clear()
        sampled = start_round(strategy, rnd, current, 10)
        sizes.append(len(sampled))
        ups = [np.full(6, 0.01 * n, dtype=np.float32) for n in sampled]
        arrays, metrics = strategy.aggregate_train(rnd, replies_for(ups, current))
        assert arrays is not None and metrics is not None
        ((scale, noise),) = rng.arrays()
        assert scale == pytest.approx(1.0 * 0.5 / 2.5, rel=1e-12)
        np.testing.assert_allclose(
            arrays["w"].numpy() - noise,
            current + sum(ups, current * 0) / 2.5,
            atol=1e-6,
        )
        assert metrics[pbase.EPSILON] == pytest.approx(rdp(1.0, 0.25, rnd), abs=1e-9)
    assert sizes != [2, 2, 2]  # not a fixed-size sample


def test_poisson_sampling_needs_dp_fedavg_and_fedavg_messages() -> None:
    with pytest.raises(ConfigError) as err:
        load_experiment(None, ["privacy.client-sampling='poisson'"])
    assert str(err.value).startswith("privacy.client-sampling: 'poisson' is ")
    assert "dp-fedavg" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="privacy.client-sampling: 'uniform'"):
        experiment("privacy.client-sampling='uniform'")
    exp = experiment("privacy.client-sampling='poisson'", "privacy.noise-multiplier=1")
    with pytest.raises(ConfigError, match="privacy.client-sampling: 'poisson' needs"):
        privacy.wrap_strategy(PersonalFedAvg(min_available_nodes=8), exp)


class PersonalFedAvg(FedAvg):
    """A FedAvg whose train messages could differ per client."""

    def configure_train(self, *args: Any) -> Iterable[Message]:
        return super().configure_train(*args)


def test_adaptive_count_noise_default_follows_the_expected_clients() -> None:
    """Default clipped-count-stddev: clients per round / 20, the expected
    number under Poisson sampling (100 x 0.33 = 33, stddev 1.65)."""
    base = (
        "federation.clients=100",
        "federation.fraction-train=0.33",
        "privacy.client-sampling='poisson'",
        "privacy.clipping='adaptive'",
    )
    uncentred = (*base, "privacy.count-release='uncentred'")
    experiment(*uncentred, "privacy.noise-multiplier=1.6")
    with pytest.raises(ConfigError, match="clipped-count-stddev = 1.65"):
        experiment(*uncentred, "privacy.noise-multiplier=1.7")
    # centred bits have sensitivity 1/2: the bound is 2 x 1.65 = 3.3
    experiment(*base, "privacy.noise-multiplier=3.2")
    with pytest.raises(ConfigError, match=r"1.65 / 1/2 \(centred count\)"):
        experiment(*base, "privacy.noise-multiplier=3.4")


@pytest.mark.parametrize(
    ("overrides", "label"),
    [
        (("privacy.client-sampling='poisson'",), "poisson"),
        ((), "poisson-approximation"),
        (("federation.fraction-train=1.0",), "full-participation"),
    ],
)
def test_summary_says_what_the_accounting_is(
    tmp_path: Path, overrides: tuple[str, ...], label: str
) -> None:
    exp = experiment("privacy.noise-multiplier=1.0", *overrides)
    recorder = RunRecorder(tmp_path, exp, extra_summary=privacy.summary_fields(exp))
    recorder.finish("completed")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["accounting"] == label
    plain = load_experiment(None, ["federation.clients=4"])
    assert privacy.summary_fields(plain) == {}


# -- 6. fedsim's own figure of the extra noise on the updates --------------------


@pytest.mark.parametrize(
    ("sigma", "ratio", "level"), [(0.9, 2.29, "WARNING"), (0.5, 1.15, "INFO")]
)
def test_adaptive_clipping_logs_its_own_noise_figure(
    caplog: pytest.LogCaptureFixture, sigma: float, ratio: float, level: str
) -> None:
    """z_u / z = (1 - (z / sigma_b)^2)^-1/2: 2.29 for z = 0.9, sigma_b = 1,
    where Flower's 2 sigma_b formula says 1.12 and would stay silent."""
    inner = wrappers.FixedDenominatorMean(
        FedAvg(), denominator=4, weight_key=NUM_EXAMPLES
    )
    with caplog.at_level(logging.INFO, logger="flwr"):
        clipping = wrappers.AdaptiveClipping(
            inner,
            noise_multiplier=sigma,
            count_stddev=1.0,
            denominator=4,
            rng=np.random.default_rng(0),
            initial_clipping_norm=0.1,
            target_unclipped_quantile=0.5,
            clip_norm_lr=0.2,
            count_release="uncentred",
        )
    assert clipping.noise_multiplier / sigma == pytest.approx((1 - sigma**2) ** -0.5)
    ours = [r for r in caplog.records if "dp-fedavg adaptive clipping" in r.message]
    assert len(ours) == 1 and ours[0].levelname == level
    assert f"({ratio:.2f}x)" in ours[0].message
    assert not any("significant amount of noise" in r.message for r in caplog.records)


# -- 7. the centred count (Andrew et al. / TF-Privacy) ----------------------------


@pytest.mark.parametrize("release", ["centred", "uncentred"])
def test_count_release_noise_norm_and_epsilon_by_hand(
    task_identity: None, updates: list[np.ndarray], release: str
) -> None:
    """Full participation (4 of 4 clients, so q = 1), z = 0.8, sigma_b = 1, one
    client fails. By hand: the updates' noise multiplier is
    ``(z^-2 - (sigma_b / s)^-2)^-1/2`` with s = 1/2 centred (0.8729), 1
    uncentred (1.3333); the unclipped share is ``(u - r / 2 + n) / 4 + 1/2``
    centred, ``(u + n) / 4`` uncentred (u = 1 unclipped of r = 3 replies, n the
    intercepted count noise), and the next norm ``exp(-0.2 (share - 0.5))``;
    the epsilon is that of the Gaussian mechanism with multiplier z at q = 1:
    RDP ``alpha / (2 z^2)`` converted as Opacus does (Balle et al. 2020),
    minimised over its orders."""
    z, lr, target = 0.8, 0.2, 0.5
    exp = load_experiment(
        None,
        [
            "model.name=mlp",
            "model.hidden=16",
            "rounds=3",
            "federation.clients=4",
            "federation.fraction-train=1.0",
            "privacy.mechanism=dp-fedavg",
            f"privacy.noise-multiplier={z}",
            "privacy.clipping='adaptive'",
            "privacy.clipped-count-stddev=1.0",
            f"privacy.count-release='{release}'",
            f"privacy.clip-norm-lr={lr}",
        ],
    )
    rng = RecordingRng(3)
    strategy = chain(exp, rng)
    current = np.zeros(SIZE, np.float32)
    assert len(start_round(strategy, 1, current, 4)) == 4
    _, metrics = strategy.aggregate_train(1, replies_for([*updates, None], current))
    assert metrics is not None
    z_u = {"centred": 0.8729, "uncentred": 1.3333}[release]
    ((scale, _),) = rng.arrays()
    assert scale / 1.0 * 4 == pytest.approx(z_u, abs=1e-4)  # z_u C / D, C = 1
    ((count_scale, n),) = rng.scalars()
    assert count_scale == 1.0
    share = (1 - 3 / 2 + n) / 4 + 0.5 if release == "centred" else (1 + n) / 4
    share = min(max(share, 0.0), 1.0)
    inner = strategy.strategy
    assert inner.clipping_norm == pytest.approx(math.exp(-lr * (share - target)))
    orders = np.array([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
    rdp_eps = orders / (2 * z**2)
    eps = (
        rdp_eps
        + np.log((orders - 1) / orders)
        - (np.log(1e-5) + np.log(orders)) / (orders - 1)
    )
    assert metrics[pbase.EPSILON] == pytest.approx(float(np.nanmin(eps)), rel=1e-9)
