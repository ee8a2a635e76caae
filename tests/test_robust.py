"""PGD robust evaluation (every family), against hand-computed attacks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedsim.core.errors import ConfigError
from fedsim.core.experiment import RobustConfig
from fedsim.core.loading import load_experiment
from fedsim.learn.data import Arrays, federated_data
from fedsim.learn.models import MLP
from fedsim.learn.robust import pgd, robust_evaluate, robust_metrics, step_size_of
from fedsim.learn.training import evaluate, make_loader, train_epochs


@pytest.fixture(scope="module")
def trained() -> tuple[MLP, Arrays]:
    """An MLP trained centrally on digits (about 95 % clean accuracy)."""
    exp = load_experiment(None, ["federation.clients=1"])
    data = federated_data(exp.data, 1, 0)
    torch.manual_seed(0)
    model = MLP(64, 32, 10, 0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = make_loader(data.client(0).train, 32, seed=0)
    train_epochs(model, loader, opt, epochs=5, device=torch.device("cpu"))
    return model, data.test


def test_pgd_stays_within_epsilon_and_in_the_data_range(trained) -> None:
    model, test = trained
    model.zero_grad(set_to_none=True)
    x, y = torch.from_numpy(test.x[:64]), torch.from_numpy(test.y[:64])
    for epsilon in (0.05, 0.2):
        adv = pgd(model, x, y, epsilon=epsilon, steps=7, step_size=0.1)
        assert float((adv - x).abs().max()) <= epsilon + 1e-6
        assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    assert all(p.grad is None for p in model.parameters())


def test_one_step_without_random_start_is_fgsm(trained) -> None:
    model, test = trained
    x, y = torch.from_numpy(test.x[:16]), torch.from_numpy(test.y[:16])
    leaf = x.clone().requires_grad_(True)
    F.cross_entropy(model(leaf), y).backward()
    want = (x + 0.1 * leaf.grad.sign()).clamp(0, 1)  # type: ignore[union-attr]
    got = pgd(model, x, y, epsilon=0.1, steps=1, step_size=0.1, random_start=False)
    torch.testing.assert_close(got, want)


def test_pgd_lowers_accuracy_and_epsilon_zero_reports_nothing(trained) -> None:
    model, test = trained
    cpu = torch.device("cpu")
    clean = evaluate(model, test, device=cpu)
    cfg = RobustConfig(epsilon=0.1, steps=10)
    assert step_size_of(cfg) == pytest.approx(0.025)
    robust = robust_evaluate(model, test, cfg, device=cpu, seed=1)
    assert clean.accuracy > 0.85
    assert robust.accuracy < clean.accuracy - 0.2
    weaker = robust_evaluate(
        model, test, dataclasses.replace(cfg, epsilon=0.02), device=cpu, seed=1
    )
    assert robust.accuracy < weaker.accuracy <= clean.accuracy
    metrics = robust_metrics(model, test, cfg, device=cpu, seed=1)
    assert metrics["robust-accuracy"] == robust.accuracy
    assert robust_metrics(model, test, RobustConfig(), device=cpu) == {}


def test_robust_keys_are_validated() -> None:
    with pytest.raises(ConfigError, match="robust.epsilon"):
        load_experiment(None, ["robust.epsilon=-0.1"])
    with pytest.raises(ConfigError, match="robust.steps"):
        load_experiment(None, ["robust.steps=0"])
    exp = load_experiment(None, ["robust.epsilon=0.1", "robust.step-size=0.01"])
    assert step_size_of(exp.robust) == 0.01
    assert np.isfinite(exp.robust.epsilon)


def test_fedavg_and_hyperfl_clients_report_robust_accuracy() -> None:
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    from fedsim.clients.full import FullModelClient
    from fedsim.clients.hyperfl import HyperFLClient
    from fedsim.core.messages import ARRAYS, CONFIG, SERVER_ROUND
    from tests.test_heterofl import INFO, fake_client

    for name, cls in (("fedavg", FullModelClient), ("hyperfl", HyperFLClient)):
        exp = load_experiment(
            None,
            [
                f"strategy.name={name}",
                "model.name=mlp",
                "model.hidden=8",
                "robust.epsilon=0.1",
                "robust.steps=2",
            ],
        )
        client = cls(exp, INFO, torch.device("cpu"))
        shared = client.model.hypernetwork if name == "hyperfl" else client.model
        content = RecordDict(
            {
                ARRAYS: ArrayRecord(shared.state_dict()),
                CONFIG: ConfigRecord({SERVER_ROUND: 1}),
            }
        )
        metrics = client.evaluate(
            content, fake_client(0), server_round=1, state=RecordDict()
        )["metrics"]
        assert 0 <= metrics["robust-accuracy"] <= 1, name
        assert metrics["robust-loss"] >= metrics["loss"] - 1e-6, name
