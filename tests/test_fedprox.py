"""FedProx and the one training loop's loss hooks: ``mu = 0`` is FedAvg bit for
bit; a proximal step equals the hand-computed one; the hooks reach the loop
(``fit_round(loss=..., penalty=...)``); under DP-SGD the penalty's gradient is
added after Opacus' clipping and noise (in the loss it would be dropped)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedsim import privacy
from fedsim.clients.fedprox import FedProxClient, proximal_term
from fedsim.clients.full import fit_round
from fedsim.core.messages import ARRAYS, CONFIG, METRICS
from fedsim.learn.base import build_model
from fedsim.learn.data import federated_data
from fedsim.learn.training import cross_entropy, local_fit
from tests.conftest import experiment, run_rounds

CPU = torch.device("cpu")


@pytest.mark.usefixtures("task_identity", "one_thread")
def test_mu_zero_equals_fedavg_bit_for_bit(tmp_path: Path) -> None:
    runs = {}
    for name, extra in (("fedavg", ()), ("fedprox", ("strategy.proximal-mu=0",))):
        exp = experiment(name, "federation.clients=3", "train.epochs=2", *extra)
        final, grid, _ = run_rounds(exp, 2, tmp_path / name)
        replies = [
            (r.content[METRICS]["loss"], r.content[ARRAYS].to_numpy_ndarrays())
            for _, r in grid.log
            if ARRAYS in r.content
        ]
        runs[name] = (final.to_numpy_ndarrays(), replies)
    (avg, avg_replies), (prox, prox_replies) = runs["fedavg"], runs["fedprox"]
    assert len(avg_replies) == len(prox_replies) == 6
    for a, b in zip(avg, prox, strict=True):
        np.testing.assert_array_equal(a, b)
    for (la, aa), (lb, ab) in zip(avg_replies, prox_replies, strict=True):
        assert la == lb
        for a, b in zip(aa, ab, strict=True):
            np.testing.assert_array_equal(a, b)


def _setup(*overrides: str):  # type: ignore[no-untyped-def]
    exp = experiment(
        "fedprox",
        "federation.clients=3",
        "train.batch-size=1024",  # one batch: the whole local train split
        "train.momentum=0.0",
        "train.lr=0.5",
        *overrides,
    )
    data = federated_data(exp.data, exp.federation.clients, exp.seed)
    return exp, data.client(0), data.info


def _grad(model: torch.nn.Module, params: dict, x, y) -> dict:  # type: ignore[no-untyped-def]
    p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    out = torch.func.functional_call(model, p, (x,))
    grads = torch.autograd.grad(F.cross_entropy(out, y), list(p.values()))
    return dict(zip(p, grads, strict=True))


@pytest.mark.usefixtures("one_thread")
def test_a_proximal_step_equals_the_hand_computed_one() -> None:
    mu, lr = 0.7, 0.5
    exp, data, info = _setup(f"strategy.proximal-mu={mu}", "train.epochs=2")
    client = FedProxClient(exp, info, CPU)
    w0 = {k: v.detach().clone() for k, v in client.model.named_parameters()}
    content = RecordDict(
        {
            ARRAYS: ArrayRecord(client.model.state_dict()),
            CONFIG: ConfigRecord({"server-round": 1}),
        }
    )
    reply = client.train(content, data, server_round=1, state=RecordDict())
    got = reply[ARRAYS].to_torch_state_dict()  # type: ignore[union-attr]

    model = build_model(exp.model, info, exp.seed)
    x, y = torch.from_numpy(data.train.x), torch.from_numpy(data.train.y)
    # step 1 starts at the global model: the proximal gradient is 0 there
    g0 = _grad(model, w0, x, y)
    w1 = {k: w0[k] - lr * g0[k] for k in w0}
    # step 2: w2 = w1 - lr (g(w1) + mu (w1 - w0))
    g1 = _grad(model, w1, x, y)
    w2 = {k: w1[k] - lr * (g1[k] + mu * (w1[k] - w0[k])) for k in w0}
    plain = {k: w1[k] - lr * g1[k] for k in w0}
    for k in w0:
        torch.testing.assert_close(got[k], w2[k], rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(got[k], plain[k], atol=1e-5) for k in w0)


def _anchored(model: torch.nn.Module, mu: float):  # type: ignore[no-untyped-def]
    """A proximal term anchored away from the model's weights (so its gradient
    is not 0 at the first step), and its gradient there."""
    params = [p for p in model.parameters()]
    with torch.no_grad():
        for p in params:
            p.add_(0.1)
    term = proximal_term(params, mu)
    with torch.no_grad():
        for p in params:
            p.sub_(0.1)
    return term, [-mu * 0.1 * torch.ones_like(p) for p in params]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("mechanism", ["none", "dp-sgd"])
def test_the_penalty_gradient_is_added_to_each_step(mechanism: str) -> None:
    """One step with ``penalty`` = the step without it minus ``lr *
    grad(penalty)``: plainly, and under DP-SGD after Opacus' clipping and
    noise (same seed, same noise)."""
    mu, lr = 0.3, 0.5
    dp = ("privacy.noise-multiplier=1.0", "privacy.max-grad-norm=0.5")
    exp, data, info = _setup(
        "train.epochs=1",
        f"privacy.mechanism={mechanism}",
        *(dp if mechanism == "dp-sgd" else ()),
    )
    privacy.client_mechanism.cache_clear()

    def step(penalized: bool, in_loss: bool = False) -> list[torch.Tensor]:
        model = build_model(exp.model, info, exp.seed)
        term, grads = _anchored(model, mu)
        loss = cross_entropy
        if in_loss:  # the penalty put into the loss instead

            def loss(m, xb, yb):  # type: ignore[no-untyped-def]
                return cross_entropy(m, xb, yb) + term()

        stats, _ = fit_round(
            model,
            data,
            exp,
            server_round=1,
            device=CPU,
            state=RecordDict(),
            loss=loss,
            penalty=term if penalized else None,
        )
        assert stats.steps == 1
        step.grads = grads  # type: ignore[attr-defined]
        return [p.detach().clone() for p in model.parameters()]

    plain, with_penalty = step(False), step(True)
    for p, q, g in zip(plain, with_penalty, step.grads, strict=True):  # type: ignore[attr-defined]
        torch.testing.assert_close(q, p - lr * g, rtol=1e-5, atol=1e-6)
    in_loss = step(False, in_loss=True)
    same = all(torch.equal(p, q) for p, q in zip(plain, in_loss, strict=True))
    # Opacus drops a term outside the per-example loss: that is why the hook
    assert same == (mechanism == "dp-sgd")
    privacy.client_mechanism.cache_clear()


def test_local_fit_passes_the_loss_hook() -> None:
    """A custom ``loss`` is what the loop minimises: twice the cross-entropy at
    lr equals the cross-entropy at 2 lr, step for step."""
    exp, data, info = _setup("train.lr=0.25", "train.epochs=2")
    exp2, _, _ = _setup("train.lr=0.5", "train.epochs=2")
    a, b = build_model(exp.model, info, 0), build_model(exp.model, info, 0)
    mech = privacy.client_mechanism(exp)
    local_fit(
        a,
        data.train,
        exp,
        seed=1,
        device=CPU,
        state=RecordDict(),
        mechanism=mech,
        loss=lambda m, x, y: 2 * cross_entropy(m, x, y),
    )
    local_fit(
        b, data.train, exp2, seed=1, device=CPU, state=RecordDict(), mechanism=mech
    )
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_fedprox_runs_under_the_dp_fedavg_chain() -> None:
    """FedProx's server is FedAvg's, so DP-FedAvg's chain wraps it."""
    from fedsim.privacy import dp_fedavg
    from tests.conftest import strategy_for

    exp = experiment(
        "fedprox",
        "federation.clients=3",
        "privacy.mechanism=dp-fedavg",
        "privacy.noise-multiplier=1.0",
    )
    wrapped = privacy.mechanism_class(exp).wrap_strategy(strategy_for(exp), exp)
    assert isinstance(wrapped, dp_fedavg.DpFedAvgAccounting)
