"""DP-SGD and DP-FedAvg mechanisms against Opacus, PyTorch and numpy oracles."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import (
    Array,
    ArrayRecord,
    Message,
    MetricRecord,
    RecordDict,
)
from opacus.accountants import RDPAccountant
from torch import nn

from fedsim import privacy
from fedsim.core.errors import ConfigError, RunStopped
from fedsim.core.experiment import Experiment
from fedsim.core.loading import load_experiment
from fedsim.core.messages import ARRAYS, NUM_EXAMPLES, PARTITION_ID
from fedsim.learn.base import build_model
from fedsim.learn.data import Arrays, DatasetInfo, federated_data
from fedsim.learn.training import local_fit
from fedsim.privacy import accounting, budget, dp_fedavg, dp_sgd
from fedsim.privacy import base as pbase
from tests.conftest import reply

CPU = torch.device("cpu")
DIGITS = DatasetInfo((1, 8, 8), 10)


def experiment(*overrides: str) -> Experiment:
    return load_experiment(
        None,
        [
            "model.name=mlp",
            "model.hidden=16",
            "rounds=3",
            "train.epochs=1",
            "train.batch-size=16",
            "federation.clients=4",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def client_train() -> Arrays:
    """Client 0's local training split of the digits federation (4 clients)."""
    exp = experiment()
    data = federated_data(exp.data, exp.federation.clients, exp.seed)
    return data.client(0).train


def fit_rounds(
    exp: Experiment, model: nn.Module, train: Arrays, rounds: int, state: RecordDict
) -> list[dict[str, float]]:
    reports = []
    for r in range(1, rounds + 1):
        model.eval()  # as federated evaluation leaves it between rounds
        stats, extra = local_fit(
            model,
            train,
            exp,
            seed=r,
            device=CPU,
            state=state,
            mechanism=privacy.client_mechanism(exp),
        )
        reports.append({"examples": stats.examples, **extra})
    return reports


# -- cumulative accounting -------------------------------------------------------


def test_cumulative_epsilon_equals_opacus_rdp_accountant(client_train: Arrays) -> None:
    exp = experiment("privacy.mechanism=dp-sgd", "privacy.noise-multiplier=1.1")
    model = build_model(exp.model, DIGITS, 0)
    state = RecordDict()
    reports = fit_rounds(exp, model, client_train, 3, state)
    q, per_round, _ = accounting.planned_steps(
        len(client_train), exp.train.batch_size, exp.train.epochs, exp.rounds
    )
    for r, report in enumerate(reports, start=1):
        oracle = RDPAccountant()
        for _ in range(r * per_round):
            oracle.step(noise_multiplier=1.1, sample_rate=q)
        assert report[pbase.EPSILON] == pytest.approx(
            oracle.get_epsilon(exp.privacy.target_delta), abs=1e-6
        )
        assert report[pbase.NOISE_MULTIPLIER] == 1.1
    # the history carried in the client's state is the accountant's own
    assert dp_sgd.load_history(state) == [(1.1, q, 3 * per_round)]
    epsilons = [r[pbase.EPSILON] for r in reports]
    assert epsilons == sorted(epsilons) and epsilons[0] < epsilons[-1]


def test_prv_accountant_is_used_when_selected(client_train: Arrays) -> None:
    exp = experiment(
        "privacy.mechanism=dp-sgd",
        "privacy.noise-multiplier=1.0",
        "privacy.accountant='prv'",
    )
    state = RecordDict()
    (report,) = fit_rounds(
        exp, build_model(exp.model, DIGITS, 0), client_train, 1, state
    )
    history = dp_sgd.load_history(state)
    assert report[pbase.EPSILON] == pytest.approx(
        accounting.epsilon(history, 1e-5, "prv"), abs=1e-6
    )
    assert report[pbase.EPSILON] < accounting.epsilon(history, 1e-5, "rdp")


def test_target_epsilon_calibration_spends_budget_by_the_last_round(
    client_train: Arrays,
) -> None:
    target = 2.0
    exp = experiment("privacy.mechanism=dp-sgd", f"privacy.target-epsilon={target}")
    state = RecordDict()
    model = build_model(exp.model, DIGITS, 0)
    reports = fit_rounds(exp, model, client_train, exp.rounds, state)
    assert all(pbase.DECLINED not in r for r in reports)
    final = reports[-1][pbase.EPSILON]
    assert final <= target
    assert final >= 0.95 * target
    # calibrated for the whole run, not one round: round 1 spends far less
    assert reports[0][pbase.EPSILON] < 0.8 * target


def test_client_declines_when_next_round_exceeds_budget(client_train: Arrays) -> None:
    q, per_round, _ = accounting.planned_steps(len(client_train), 16, 1, 3)
    one = accounting.epsilon([(1.0, q, per_round)], 1e-5)
    two = accounting.epsilon([(1.0, q, 2 * per_round)], 1e-5)
    target = (one + two) / 2
    exp = experiment(
        "privacy.mechanism=dp-sgd",
        "privacy.noise-multiplier=1.0",
        f"privacy.target-epsilon={target}",
    )
    model = build_model(exp.model, DIGITS, 0)
    state = RecordDict()
    (first,) = fit_rounds(exp, model, client_train, 1, state)
    assert first[pbase.EPSILON] == pytest.approx(one, abs=1e-9)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    (second,) = fit_rounds(exp, model, client_train, 1, state)
    assert second[pbase.DECLINED] == 1.0
    assert second["examples"] == 0
    assert second[pbase.EPSILON] == pytest.approx(one, abs=1e-9)
    assert dp_sgd.load_history(state) == [(1.0, q, per_round)]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


# -- clipping --------------------------------------------------------------------


def test_noise_free_step_sums_clipped_per_example_gradients(
    client_train: Arrays,
) -> None:
    """With noise 0, one full-batch step moves the model by exactly the mean of
    the per-example gradients clipped to max-grad-norm (PyTorch oracle)."""
    clip = 0.05
    exp = experiment(
        "privacy.mechanism=dp-sgd",
        "privacy.noise-multiplier=1.0",
        f"privacy.max-grad-norm={clip}",
        "train.batch-size=1024",  # one Poisson batch holding every example
        "train.momentum=0.0",
        "train.lr=1.0",
    )
    exp = dataclasses.replace(
        exp, privacy=dataclasses.replace(exp.privacy, noise_multiplier=0.0)
    )
    train = client_train.subset(np.arange(40))
    model = build_model(exp.model, DIGITS, 0)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}

    def loss_one(
        p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        out = torch.func.functional_call(model, p, (x.unsqueeze(0),))
        return F.cross_entropy(out, y.unsqueeze(0))

    x, y = torch.from_numpy(train.x), torch.from_numpy(train.y)
    grads = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))(
        params, x, y
    )
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads.values()))
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    clipped = {k: g * factors.view(-1, *[1] * (g.dim() - 1)) for k, g in grads.items()}
    clipped_norms = torch.sqrt(
        sum(c.flatten(1).pow(2).sum(1) for c in clipped.values())
    )
    assert (norms > clip).all()  # clipping is active for every example
    assert (clipped_norms <= clip + 1e-6).all()

    stats, extra = local_fit(
        model,
        train,
        exp,
        seed=0,
        device=CPU,
        state=RecordDict(),
        mechanism=privacy.client_mechanism(exp),
    )
    assert stats.examples == len(train) and stats.steps == 1
    assert extra[pbase.EPSILON] == float("inf")  # no noise, no privacy
    for name, p in model.named_parameters():
        moved = params[name] - p.detach()
        expected = clipped[name].sum(0) / len(train)
        torch.testing.assert_close(moved, expected, rtol=1e-4, atol=1e-6)


# -- guards (Opacus + PEFT, issue #820) ------------------------------------------


def tiny_vit_experiment(*overrides: str) -> Experiment:
    return experiment(
        "model.name=vit",
        "model.hidden=16",
        "model.heads=2",
        "model.depth=1",
        "privacy.mechanism=dp-sgd",
        "privacy.noise-multiplier=1.0",
        *overrides,
    )


def test_dp_sgd_trains_lora_adapters_of_a_peft_model(client_train: Arrays) -> None:
    import peft

    exp = tiny_vit_experiment()
    base = build_model(exp.model, DIGITS, 0)
    model = peft.get_peft_model(
        base,
        peft.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "k_proj", "v_proj", "out_proj"],
            modules_to_save=["head"],
        ),
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any(
        "lora_B" in n for n in trainable
    )
    train = client_train.subset(np.arange(96))
    stats, extra = local_fit(
        model,
        train,
        exp,
        seed=1,
        device=CPU,
        state=RecordDict(),
        mechanism=privacy.client_mechanism(exp),
    )
    assert stats.steps > 0 and 0 < extra[pbase.EPSILON] < float("inf")
    for name, p in model.named_parameters():
        changed = not torch.equal(p.detach(), before[name])
        assert changed == (name in trainable), name
    # B starts at zero: after DP steps every LoRA B is non-zero
    for name, p in model.named_parameters():
        if "lora_B" in name:
            assert p.detach().abs().sum() > 0, name
    # Opacus' hooks are gone: a plain backward leaves no per-example gradients
    model.zero_grad()
    F.cross_entropy(
        model(torch.from_numpy(client_train.x[:3])), torch.zeros(3, dtype=torch.long)
    ).backward()
    assert all(getattr(p, "grad_sample", None) is None for p in model.parameters())


class BatchSharedEmbedding(nn.Module):
    """An embedding looked up once for the whole batch: Opacus gets no
    per-example input for it, so it cannot have per-example gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Embedding(1, 10)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = self.bias(torch.zeros(1, dtype=torch.long))
        return self.head(x.flatten(1)) + shared


def test_missing_per_example_gradient_is_caught(client_train: Arrays) -> None:
    """An embedding shared by the whole batch gets no per-example gradient from
    Opacus; the guard says so instead of letting the step run. The ViT, which
    looks its embeddings up per example, trains."""
    exp = tiny_vit_experiment()
    with pytest.raises(dp_sgd.PerSampleGradientError, match="per-example gradient"):
        local_fit(
            BatchSharedEmbedding(),
            client_train,
            exp,
            seed=1,
            device=CPU,
            state=RecordDict(),
            mechanism=privacy.client_mechanism(exp),
        )
    model = build_model(exp.model, DIGITS, 0)
    before = [p.detach().clone() for p in model.parameters()]
    local_fit(
        model,
        client_train,
        exp,
        seed=1,
        device=CPU,
        state=RecordDict(),
        mechanism=privacy.client_mechanism(exp),
    )
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_stale_optimizer_parameters_are_caught(client_train: Arrays) -> None:
    exp = experiment("privacy.mechanism=dp-sgd", "privacy.noise-multiplier=1.0")
    model = build_model(exp.model, DIGITS, 0)
    stale = build_model(exp.model, DIGITS, 0)
    optimizer = torch.optim.SGD(stale.parameters(), lr=0.1)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(
            torch.from_numpy(client_train.x), torch.from_numpy(client_train.y)
        ),
        batch_size=16,
    )
    mechanism = dp_sgd.DpSgd(exp)
    with pytest.raises(dp_sgd.PerSampleGradientError, match="optimizer"):
        mechanism.fit(
            model, optimizer, loader, epochs=1, device=CPU, state=RecordDict()
        )


def test_step_that_moves_nothing_is_caught(client_train: Arrays) -> None:
    exp = experiment("privacy.mechanism=dp-sgd", "privacy.noise-multiplier=1.0")
    model = build_model(exp.model, DIGITS, 0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(
            torch.from_numpy(client_train.x), torch.from_numpy(client_train.y)
        ),
        batch_size=16,
    )
    with pytest.raises(dp_sgd.PerSampleGradientError, match="unchanged"):
        dp_sgd.DpSgd(exp).fit(
            model, optimizer, loader, epochs=1, device=CPU, state=RecordDict()
        )


# -- validation before training --------------------------------------------------


class BatchNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.norm = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 6 * 6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.conv(x)).flatten(1))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "privacy.noise-multiplier=-0.5",
            "privacy.noise-multiplier: -0.5 must be >= 0",
        ),
        ("privacy.max-grad-norm=0", "privacy.max-grad-norm: 0.0 must be > 0"),
        ("privacy.target-delta=0", "privacy.target-delta: 0.0 must be in (0, 1)"),
        ("privacy.target-delta=1", "privacy.target-delta: 1.0 must be in (0, 1)"),
        ("privacy.target-epsilon=-1", "privacy.target-epsilon: -1.0 must be >= 0"),
        ("privacy.clipping-norm=0", "privacy.clipping-norm: 0.0 must be > 0"),
        ("privacy.accountant='gdp'", "privacy.accountant: 'gdp' is not allowed"),
        ("privacy.clipping='median'", "privacy.clipping: 'median' is not allowed"),
        ("privacy.mechanism='dp'", "privacy.mechanism: 'dp' is not registered"),
    ],
)
def test_invalid_privacy_settings_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        experiment("privacy.mechanism=dp-sgd", "privacy.noise-multiplier=1.0", override)
    assert str(err.value).startswith(message)


def test_mechanism_needs_noise_or_budget() -> None:
    with pytest.raises(ConfigError, match="noise-multiplier > 0 or target-epsilon > 0"):
        experiment("privacy.mechanism=dp-sgd")
    experiment("privacy.mechanism=dp-sgd", "privacy.target-epsilon=3")
    experiment("privacy.mechanism=dp-fedavg", "privacy.noise-multiplier=0.8")


@pytest.mark.parametrize("name", ["flora", "fedit"])
def test_dp_fedavg_rejects_strategies_it_cannot_clip(name: str) -> None:
    with pytest.raises(ConfigError, match=f"strategy.name: '{name}' cannot run") as err:
        experiment(
            "privacy.mechanism=dp-fedavg",
            "privacy.noise-multiplier=1.0",
            f"strategy.name={name}",
            "peft.method=lora",
        )
    assert "dp-sgd" in str(err.value)


def test_adaptive_clipping_noise_must_leave_room_for_the_count() -> None:
    with pytest.raises(ConfigError, match="clipped-count-stddev"):
        experiment(
            "privacy.mechanism=dp-fedavg",
            "privacy.noise-multiplier=0.5",
            "privacy.clipping='adaptive'",
        )
    experiment(
        "privacy.mechanism=dp-fedavg",
        "privacy.noise-multiplier=0.5",
        "privacy.clipping='adaptive'",
        "privacy.clipped-count-stddev=1.0",
    )


def test_preflight_rejects_batchnorm_with_groupnorm_hint() -> None:
    exp = experiment("privacy.mechanism=dp-sgd", "privacy.noise-multiplier=1.0")
    data = federated_data(exp.data, exp.federation.clients, exp.seed)
    with pytest.raises(ConfigError, match="GroupNorm"):
        privacy.preflight(exp, BatchNormNet(), data)
    privacy.preflight(exp, build_model(exp.model, data.info, 0), data)


def test_preflight_rejects_models_without_per_example_gradients() -> None:
    exp = tiny_vit_experiment()
    data = federated_data(exp.data, exp.federation.clients, exp.seed)
    with pytest.raises(ConfigError, match="peft.method"):
        privacy.preflight(exp, BatchSharedEmbedding(), data)
    # the full ViT looks its embeddings up per example, so it trains under DP-SGD
    privacy.preflight(exp, build_model(exp.model, data.info, 0), data)


def test_cli_rejects_batchnorm_before_training(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedsim.engine.host import cli
    from fedsim.learn import base

    monkeypatch.setattr(base, "build_model", lambda cfg, info, seed: BatchNormNet())
    code = cli.main(
        [
            "run",
            "--set",
            "privacy.mechanism=dp-sgd",
            "--set",
            "privacy.noise-multiplier=1.0",
            "--set",
            "federation.clients=4",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "BatchNorm" in err and "GroupNorm" in err
    assert list(tmp_path.iterdir()) == []  # nothing written, nothing started


# -- server side -----------------------------------------------------------------


class Recorder:
    """A stand-in strategy that returns the mean of what it receives."""

    clipping_norm = 1.0

    def __init__(self) -> None:
        self.seen: list[list[Message]] = []

    def configure_train(self, *args: object) -> list[Message]:
        return []

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self.seen.append(replies)
        if not replies:
            return ArrayRecord(), MetricRecord()
        w = np.mean([r.content[ARRAYS]["w"].numpy() for r in replies], axis=0)
        return ArrayRecord({"w": Array(w)}), MetricRecord({"loss": 1.0})


def test_budget_strategy_keeps_declined_replies_out_and_stops(
    task_identity: None,
) -> None:
    inner = Recorder()
    strategy = budget.PrivacyBudgetStrategy(
        inner,
        num_clients=3,
        target_epsilon=2.0,  # type: ignore[arg-type]
    )
    w = np.ones(2, dtype=np.float32)
    replies = [
        reply({"w": w}, {NUM_EXAMPLES: 5, pbase.EPSILON: 1.5, PARTITION_ID: 0}, 1),
        reply({"w": 3 * w}, {NUM_EXAMPLES: 5, pbase.EPSILON: 0.5, PARTITION_ID: 1}, 2),
        reply(
            {"w": 100 * w},
            {
                NUM_EXAMPLES: 0,
                pbase.EPSILON: 1.9,
                pbase.DECLINED: 1,
                PARTITION_ID: 2,
            },
            3,
        ),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    np.testing.assert_allclose(arrays["w"].numpy(), 2 * w)  # declined one left out
    assert len(inner.seen[0]) == 2
    assert metrics[pbase.EPSILON_MAX] == 1.9
    assert metrics[pbase.EPSILON_MEAN] == pytest.approx((1.5 + 0.5 + 1.9) / 3)
    assert metrics[pbase.CLIENTS_DECLINED] == 1
    # everyone declines: the run stops cleanly with the reason
    declined = [
        reply(
            {"w": w},
            {
                NUM_EXAMPLES: 0,
                pbase.EPSILON: 1.9,
                pbase.DECLINED: 1,
                PARTITION_ID: i,
            },
            i + 1,
        )
        for i in range(2)
    ]
    with pytest.raises(RunStopped, match="privacy budget spent"):
        strategy.aggregate_train(2, declined)


def test_dp_fedavg_accounting_per_round_and_budget_stop() -> None:
    inner = Recorder()
    strategy = dp_fedavg.DpFedAvgAccounting(
        inner,
        noise_multiplier=1.0,
        sample_rate=0.25,
        target_delta=1e-5,
        target_epsilon=accounting.epsilon([(1.0, 0.25, 3)], 1e-5) + 1e-9,
    )
    oracle = RDPAccountant()
    for rnd in range(1, 4):
        strategy.configure_train(rnd, ArrayRecord(), None, None)  # type: ignore[arg-type]
        _, metrics = strategy.aggregate_train(rnd, [])
        oracle.step(noise_multiplier=1.0, sample_rate=0.25)
        assert metrics is not None
        assert metrics[pbase.EPSILON] == pytest.approx(
            oracle.get_epsilon(1e-5), abs=1e-6
        )
    with pytest.raises(RunStopped, match="privacy budget spent"):
        strategy.configure_train(4, ArrayRecord(), None, None)  # type: ignore[arg-type]
