"""SFPrompt (Cao et al., 2024): EL2N pruning, soft prompts, the three-segment
model and the family's round, against direct computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedsim.learn.prompts import (
    Prompts,
    el2n_scores,
    hardest,
    init_prompts,
    insert_prompts,
    keep_count,
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: a second thread only adds contention on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
