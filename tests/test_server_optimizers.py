"""The server optimiser families: FedAdam, FedYogi, FedAdagrad (Reddi et al. 2021, Algorithm 2) and FedAvgM (Hsu et al. 2019)
against numpy implementations of the papers' formulas and Flower's own
strategies, over three rounds of given client updates; their state survives a
resume checkpoint."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvgM, FedYogi

from fedsim.core import registry
from fedsim.core.errors import ConfigError
from fedsim.core.loading import load_experiment
from fedsim.core.messages import NUM_EXAMPLES
from fedsim.engine.server import resume_checkpoint
from fedsim.protocol.setup import ServerSetup
from tests.conftest import ScriptedGrid, reply

pytestmark = pytest.mark.usefixtures("task_identity")

SHAPES = {"w": (4, 3), "b": (3,)}
WEIGHTS = (30.0, 10.0, 60.0)
FLOWER = {"adam": FedAdam, "yogi": FedYogi, "adagrad": FedAdagrad}


def experiment(*overrides: str) -> Any:
    return load_experiment(
        None, ["federation.clients=3", "federation.fraction-train=1.0", *overrides]
    )


def strategy(exp: Any) -> Any:
    """The family's server strategy (its build needs only the experiment)."""
    setup = ServerSetup(exp, None, None, None, torch.device("cpu"))  # type: ignore[arg-type]
    return registry.family(exp.strategy.name).load_server()(setup)


def round_updates(server_round: int) -> list[dict[str, np.ndarray]]:
    """Three clients' model deltas of ``server_round`` (fixed, random)."""
    rng = np.random.default_rng(server_round)
    return [
        {k: rng.normal(0, 0.1, s).astype(np.float32) for k, s in SHAPES.items()}
        for _ in WEIGHTS
    ]


def run(s: Any, x: dict[str, np.ndarray], rounds: range) -> list[dict[str, np.ndarray]]:
    """Drive ``s`` through ``rounds``: each client replies ``x + delta``."""
    grid = ScriptedGrid({1: 0, 2: 1, 3: 2})
    out = []
    for t in rounds:
        list(s.configure_train(t, resume_checkpoint.arrays_record(x), ConfigRecord(), grid))
        replies = [
            reply({k: x[k] + d[k] for k in x}, {NUM_EXAMPLES: n}, src=i + 1)
            for i, (d, n) in enumerate(zip(round_updates(t), WEIGHTS, strict=True))
        ]
        new, _ = s.aggregate_train(t, replies)
        x = {k: a.numpy() for k, a in new.items()}
        out.append(x)
    return out


def paper(
    name: str, x0: dict[str, np.ndarray], opts: Any
) -> list[dict[str, np.ndarray]]:
    """Reddi et al. Algorithm 2 / Hsu et al. in float64 on the weighted mean
    update ``D`` (Flower's FedAdam bias-corrects eta: see the family docstring)."""
    eta = opts["eta"]
    x = {k: v.astype(np.float64) for k, v in x0.items()}
    m = {k: np.zeros_like(v) for k, v in x.items()}
    v = {k: np.zeros_like(a) for k, a in x.items()}
    out = []
    for t in (1, 2, 3):
        # the clients reply x (as float32, what was sent) + delta
        sent = {k: a.astype(np.float32).astype(np.float64) for k, a in x.items()}
        ups = round_updates(t)
        D = {
            k: sum(
                n * ((sent[k] + u[k].astype(np.float64)) - sent[k])
                for u, n in zip(ups, WEIGHTS, strict=True)
            )
            / sum(WEIGHTS)
            for k in x
        }
        if name == "momentum":
            for k in x:
                v[k] = opts["beta"] * v[k] - D[k]  # pseudo-gradient x - mean = -D
                x[k] = sent[k] - eta * v[k]
        else:
            b1, b2, tau = opts["b1"], opts["b2"], opts["tau"]
            if name == "adagrad":
                b1 = 0.0  # Flower's FedAdagrad: no first-moment averaging
            step = eta
            if name == "adam":
                step = eta * np.sqrt(1 - b2 ** (t + 1)) / (1 - b1 ** (t + 1))
            for k in x:
                m[k] = b1 * m[k] + (1 - b1) * D[k]
                d2 = D[k] ** 2
                if name == "adam":
                    v[k] = b2 * v[k] + (1 - b2) * d2
                elif name == "yogi":
                    v[k] = v[k] - (1 - b2) * d2 * np.sign(v[k] - d2)
                else:
                    v[k] = v[k] + d2
                x[k] = sent[k] + step * m[k] / (np.sqrt(v[k]) + tau)
        out.append({k: a.copy() for k, a in x.items()})
    return out


def x0() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(99)
    return {k: rng.normal(0, 1, s).astype(np.float32) for k, s in SHAPES.items()}


CASES = {
    "adam": ("strategy.server-lr=0.05", "strategy.beta-1=0.8", "strategy.tau=0.01"),
    "yogi": ("strategy.server-lr=0.05", "strategy.beta-2=0.9", "strategy.tau=0.01"),
    "adagrad": ("strategy.server-lr=0.05", "strategy.tau=0.01"),
    "momentum": ("strategy.server-lr=0.7", "strategy.server-momentum=0.5"),
}
FAMILY = {
    "adam": "fedadam",
    "yogi": "fedyogi",
    "adagrad": "fedadagrad",
    "momentum": "fedavgm",
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_update_equals_the_papers_formula_and_flowers_strategy(name: str) -> None:
    exp = experiment(f"strategy.name={FAMILY[name]}", *CASES[name])
    o = exp.strategy.options
    opts = {
        "eta": o.server_lr,
        "b1": getattr(o, "beta_1", None),
        "b2": getattr(o, "beta_2", None),
        "tau": getattr(o, "tau", None),
        "beta": getattr(o, "server_momentum", None),
    }
    got = run(strategy(exp), x0(), range(1, 4))
    want = paper(name, x0(), opts)
    for g, w in zip(got, want, strict=True):
        for k in SHAPES:
            np.testing.assert_allclose(g[k], w[k], rtol=1e-5, atol=1e-6)
    # ... and is Flower's strategy, bit for bit
    common: dict[str, Any] = {"fraction_train": 1.0, "min_available_nodes": 3}
    if name == "momentum":
        flower = FedAvgM(
            **common,
            server_learning_rate=o.server_lr,
            server_momentum=o.server_momentum,
        )
    else:
        kwargs = {"eta": o.server_lr, "tau": o.tau}
        if name != "adagrad":
            kwargs.update(beta_1=o.beta_1, beta_2=o.beta_2)
        flower = FLOWER[name](**common, **kwargs)
    for g, f in zip(got, run(flower, x0(), range(1, 4)), strict=True):
        for k in SHAPES:
            np.testing.assert_array_equal(g[k], f[k])


@pytest.mark.parametrize("name", sorted(CASES))
def test_optimiser_state_survives_the_resume_checkpoint(name: str) -> None:
    exp = experiment(f"strategy.name={FAMILY[name]}", *CASES[name])
    whole = run(strategy(exp), x0(), range(1, 4))
    first = strategy(exp)
    half = run(first, x0(), range(1, 3))
    saved = resume_checkpoint.unpack(resume_checkpoint.pack({"s": resume_checkpoint.strategy_state(first)}))
    resumed = strategy(exp)
    resume_checkpoint.restore_strategy(resumed, saved["s"])
    assert saved["s"][0]["state"]  # the state is really there
    (last,) = run(resumed, half[-1], range(3, 4))
    for k in SHAPES:
        np.testing.assert_array_equal(last[k], whole[-1][k])
    fresh = run(strategy(exp), half[-1], range(3, 4))[0]  # a restart would differ
    assert any(not np.array_equal(fresh[k], whole[-1][k]) for k in SHAPES)


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("fedavgm", "beta-2"),
        ("fedadagrad", "beta-1"),
        ("fedadam", "server-momentum"),
        ("fedavg", "server-lr"),
    ],
)
def test_keys_the_optimiser_does_not_read_are_unknown(name: str, key: str) -> None:
    with pytest.raises(ConfigError, match=f"^strategy.{key}: unknown key"):
        experiment(f"strategy.name={name}", f"strategy.{key}=0.5")


@pytest.mark.parametrize("name", sorted(FAMILY.values()))
def test_dp_fedavg_is_refused_with_the_reason(name: str) -> None:
    with pytest.raises(ConfigError, match="replaces FedAvg's aggregation"):
        experiment(
            f"strategy.name={name}",
            "privacy.mechanism=dp-fedavg",
            "privacy.noise-multiplier=1.0",
        )


def test_defaults_are_flowers() -> None:
    """``server-lr`` defaults to Flower's: 0.1 (adaptive), 1.0 (FedAvgM)."""
    assert strategy(experiment("strategy.name=fedadam")).eta == FedAdam().eta
    assert strategy(experiment("strategy.name=fedavgm")).server_learning_rate == 1.0
