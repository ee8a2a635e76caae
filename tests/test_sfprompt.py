"""SFPrompt (Cao et al., 2024): EL2N pruning, soft prompts, the three-segment
model and the family's round, against direct computations."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, RecordDict

from fedsim.clients.sfprompt import SFPromptClient
from fedsim.clients.split import CURSOR
from fedsim.core.errors import ConfigError
from fedsim.core.loading import load_experiment
from fedsim.core.messages import (
    ACTIVATIONS,
    ARRAYS,
    BATCHES,
    CUT,
    LABELS,
    METRICS,
    NUM_EXAMPLES,
    PARTITION_ID,
)
from fedsim.engine.server.server_app import build
from fedsim.learn.base import build_model
from fedsim.learn.data import federated_data
from fedsim.learn.models import ViT
from fedsim.learn.prompts import (
    Prompts,
    el2n_scores,
    hardest,
    init_prompts,
    insert_prompts,
    keep_count,
)
from fedsim.learn.split import cut_points, split_model
from fedsim.strategies.split.sfprompt import check as sfprompt_check
from fedsim.strategies.split.sfprompt import prompted
from tests.conftest import TINY_SFPROMPT, run_rounds

#: Tiny tensors: one torch thread (a second only adds contention).
pytestmark = pytest.mark.usefixtures("one_thread")


def numpy_el2n(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Oracle: softmax and one-hot written out in numpy."""
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    onehot = np.eye(logits.shape[1])[labels]
    return np.sqrt(((p - onehot) ** 2).sum(axis=1))


def test_el2n_is_the_error_l2_norm() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 7)) * 3
    labels = rng.integers(0, 7, size=50)
    scores = el2n_scores(
        torch.tensor(logits, dtype=torch.float32), torch.tensor(labels)
    )
    np.testing.assert_allclose(
        scores,
        numpy_el2n(logits.astype(np.float32).astype(np.float64), labels),
        rtol=1e-9,
    )


@pytest.mark.parametrize("fraction", [0.5, 0.3, 1.0, 0.01])
def test_pruning_keeps_exactly_the_hardest_fraction(fraction) -> None:
    rng = np.random.default_rng(1)
    scores = rng.random(41)
    kept = hardest(scores, fraction)
    k = math.ceil(fraction * 41)
    assert len(kept) == k == keep_count(41, fraction)
    assert list(kept) == sorted(kept)
    # Oracle: every kept score is at least every dropped score.
    dropped = np.setdiff1d(np.arange(41), kept)
    if len(dropped):
        assert scores[kept].min() >= scores[dropped].max()
    assert set(kept) == set(np.argsort(scores)[::-1][:k])


def test_pruning_ties_go_to_the_lower_index() -> None:
    kept = hardest(np.array([0.5, 0.9, 0.5, 0.5, 0.1]), 0.6)
    np.testing.assert_array_equal(kept, [0, 1, 2])
    assert keep_count(0, 0.5) == 0
    with pytest.raises(ValueError, match="keep fraction"):
        keep_count(10, 0.0)


def test_prompts_go_after_the_class_token() -> None:
    h = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    prompts = -torch.ones(2, 3)
    out = insert_prompts(h, prompts)
    assert out.shape == (2, 6, 3)
    assert torch.equal(out[:, 0], h[:, 0])
    assert torch.equal(out[:, 1:3], prompts.expand(2, -1, -1))
    assert torch.equal(out[:, 3:], h[:, 1:])
    module = Prompts(init_prompts(2, 3, patch_dim=4, seed=0))
    assert torch.equal(module.prompts, init_prompts(2, 3, patch_dim=4, seed=0))
    assert module.prompts.abs().max() <= math.sqrt(6 / 7)
    module(h).sum().backward()
    assert torch.equal(module.prompts.grad, torch.full((2, 3), 2.0))


# -- the prompted model, the client, the round ---------------------------------------

#: A tiny SFPrompt run: the packaged vit (no pre-training: the maths does not
#: depend on the base), 2 blocks cut into head (embed + blocks.0), body
#: (blocks.1) and tail (pool + head).
TINY = (*TINY_SFPROMPT, "train.batch-size=16", "federation.clients=3", "seed=5")


def experiment(*overrides: str) -> Any:
    return load_experiment(None, [*TINY, *overrides])


def direct_logits(model: ViT, prompts: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Oracle of tail(head(x)): the ViT's modules called by hand, prompts
    concatenated after the class token, block 1 (the body) skipped."""
    tokens = model.patch_embed(model.tokens(x))
    n = tokens.shape[1]
    pos = model.pos_embed.weight[: n + 1]
    h = torch.cat([model.cls_token.weight.expand(len(x), 1, -1), tokens], 1) + pos
    h = torch.cat([h[:, :1], prompts.expand(len(x), -1, -1), h[:, 1:]], 1)
    h = model.blocks[0](h)
    return model.head(model.norm(h[:, 0]))


def test_prompted_vit_cut_in_three_runs_the_whole_model() -> None:
    exp = experiment()
    data = federated_data(exp.data, 3, exp.seed)
    model = prompted(build_model(exp.model, data.info, exp.seed), exp)
    head, body, tail = split_model(model, cut_points(model, "blocks.0", "pool"))
    x = torch.from_numpy(data.test.x[:5])
    with torch.no_grad():
        whole = model(x)
        torch.testing.assert_close(tail(body(head(x))), whole, rtol=0, atol=0)
        skipped = direct_logits(model, model.prompts, x)
        torch.testing.assert_close(tail(head(x)), skipped, rtol=1e-6, atol=1e-6)
    assert head.owns("prompts") and not body.owns("prompts")
    assert head(x).shape == (5, 1 + 4 + 4, 16)  # class token, 4 prompts, 4 patches


def test_client_prunes_the_hardest_then_updates_prompts_and_tail_locally() -> None:
    exp = experiment("split.keep-fraction=0.3", "split.local-epochs=2")
    data = federated_data(exp.data, 3, exp.seed)
    client = SFPromptClient(exp, data.info, torch.device("cpu"))
    base = copy.deepcopy(client.model)
    sent = {k: v.clone() + 0.01 for k, v in client.own_state().items()}
    assert set(sent) == {
        "prompts",
        "norm.weight",
        "norm.bias",
        "head.weight",
        "head.bias",
    }
    for name, value in sent.items():
        base.get_parameter(name).data.copy_(value)
    local = data.client(1)
    state = RecordDict()
    content = RecordDict({ARRAYS: ArrayRecord(sent)})
    reply = client.train(content, local, server_round=1, state=state)

    x, y = torch.from_numpy(local.train.x), local.train.y
    with torch.no_grad():
        logits = direct_logits(base, base.prompts, x).double().numpy()
    scores = numpy_el2n(logits, y)
    k = math.ceil(0.3 * len(y))
    kept = np.asarray(state.config_records[CURSOR]["kept"])
    assert len(kept) == k
    assert set(kept) == set(np.argsort(-scores, kind="stable")[:k])
    # The local update moved prompts and tail, nothing else.
    after = client.model.state_dict()
    for name, value in base.state_dict().items():
        moved = not torch.equal(after[name], value)
        assert moved == (name in sent), name
    # Batch 0 of the split phase is drawn from the kept examples: its head
    # activations went up, no labels.
    cut = reply.array_records[CUT]
    assert LABELS not in cut
    assert cut[f"{ACTIVATIONS}.values"].shape[1:] == (9, 16)
    assert reply[METRICS][BATCHES] == math.ceil(k / 16) * exp.train.epochs


def test_round_averages_prompts_and_tail_and_keeps_the_rest(
    task_identity: None, tmp_path: Path
) -> None:
    exp = experiment()
    final, fake, _ = run_rounds(exp, 1, tmp_path)
    initial = build(exp).initial.to_torch_state_dict()
    last = [r for _, r in fake.log if ARRAYS in r.content]
    assert len(last) == 3
    weights = [float(r.content[METRICS][NUM_EXAMPLES]) for r in last]
    sizes = [
        len(fake.data.client(int(r.content[METRICS][PARTITION_ID])).train) for r in last
    ]
    assert weights == [math.ceil(0.5 * n) for n in sizes]
    got = final.to_torch_state_dict()
    trained = set(last[0].content[ARRAYS])
    assert trained == {
        "prompts",
        "norm.weight",
        "norm.bias",
        "head.weight",
        "head.bias",
    }
    for name in trained:
        stack = np.stack([r.content[ARRAYS][name].numpy() for r in last]).astype(
            np.float64
        )
        mean = np.tensordot(np.asarray(weights) / sum(weights), stack, axes=1)
        np.testing.assert_allclose(got[name].numpy(), mean, rtol=1e-6, atol=1e-7)
        assert not np.allclose(mean, initial[name].numpy())
    for name in set(initial) - trained:
        torch.testing.assert_close(got[name], initial[name], rtol=0, atol=0)
    # U-shaped traffic: no labels and no raw inputs ever reach the server.
    for _, answer in fake.log:
        if CUT in answer.content:
            assert LABELS not in answer.content.array_records[CUT]


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="split.keep-fraction"):
        experiment("split.keep-fraction=0")
    exp = experiment("model.name=mlp")
    data = federated_data(exp.data, 3, exp.seed)
    with pytest.raises(ConfigError, match="model.name"):
        sfprompt_check(exp, build_model(exp.model, data.info, exp.seed), data)
    exp = experiment("split.tail=head")
    with pytest.raises(ConfigError, match="split.tail"):
        sfprompt_check(exp, build_model(exp.model, data.info, exp.seed), data)


def test_the_full_fine_tuning_baseline_is_the_split_experiment_under_fedavg(
    tmp_path: Path,
) -> None:
    """``experiments/fedavg_full_vit.toml`` (SFPrompt's baseline, federated full
    fine-tuning) is ``split_ushape_vit.toml`` without ``[split]`` under FedAvg,
    as ``benchmarks/sfprompt_table.py`` derives it: the same pre-trained model,
    data, federation, rounds and local budget."""
    import tomllib

    import tomli_w

    from fedsim.core.schema import as_table

    root = Path(__file__).resolve().parents[1] / "experiments"
    base = tomllib.loads((root / "split_ushape_vit.toml").read_text())
    derived = {k: v for k, v in base.items() if k != "split"}
    derived["name"], derived["strategy"] = "fedavg-full-vit", {"name": "fedavg"}
    path = tmp_path / "derived.toml"
    path.write_text(tomli_w.dumps(derived))
    baseline = load_experiment(root / "fedavg_full_vit.toml")
    assert as_table(baseline) == as_table(load_experiment(path))
    assert baseline.strategy.name == "fedavg" and baseline.model.pretrain == "digits"
