"""Soft prompts and EL2N data pruning, for SFPrompt (Cao et al., 2024).

Soft prompts (visual prompt tuning, "shallow"): ``prompts`` learnable tokens of
the encoder's width, inserted after the class token of the embedded sequence,
before the first encoder block, without positional embedding; the pre-trained
weights stay frozen.

EL2N (Paul et al., "Deep Learning on a Data Diet", 2021): the error L2 norm of
an example, ``||softmax(f(x)) - onehot(y)||_2``. SFPrompt scores every local
example with the client's own model (head and tail, the server's body skipped)
and keeps the hardest ones (largest scores).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from fedsim.core.seeding import derive_seed


def el2n_scores(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """``||softmax(logits) - onehot(labels)||_2`` per example (float64)."""
    probs = torch.softmax(logits.detach().double(), dim=-1)
    onehot = torch.nn.functional.one_hot(labels.long(), probs.shape[-1]).double()
    return torch.linalg.vector_norm(probs - onehot, dim=-1).cpu().numpy()


def keep_count(n: int, fraction: float) -> int:
    """How many of ``n`` examples a keep fraction keeps: ``ceil(fraction * n)``
    (at least one of a non-empty set)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"keep fraction must be in (0, 1], got {fraction}")
    return min(n, max(1 if n else 0, math.ceil(fraction * n - 1e-9)))


def hardest(scores: np.ndarray, fraction: float) -> np.ndarray:
    """Indices (ascending) of the ``keep_count`` largest scores; ties go to the
    lower index."""
    scores = np.asarray(scores)
    k = keep_count(len(scores), fraction)
    order = np.argsort(-scores, kind="stable")
    return np.sort(order[:k])


def insert_prompts(h: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """``[class token, prompts, tokens...]`` from ``[class token, tokens...]``.

    Parameters
    ----------
    h : Tensor
        Embedded sequence, ``(batch, 1 + tokens, dim)``, class token first.
    prompts : Tensor
        ``(prompts, dim)``, shared by every example.
    """
    batch = prompts.unsqueeze(0).expand(h.shape[0], -1, -1)
    return torch.cat([h[:, :1], batch, h[:, 1:]], dim=1)


def init_prompts(count: int, dim: int, patch_dim: int, seed: int) -> torch.Tensor:
    """Seeded initial prompts, uniform in ``+-sqrt(6 / (patch_dim + dim))`` (VPT's
    Xavier-uniform init over the patch projection's fan-in and fan-out)."""
    bound = math.sqrt(6.0 / (patch_dim + dim))
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(count, dim, generator=generator) * 2 - 1) * bound


class Prompts(nn.Module):
    """The learnable prompt tokens (parameter ``prompts``)."""

    def __init__(self, initial: torch.Tensor):
        super().__init__()
        self.prompts = nn.Parameter(initial.clone())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return insert_prompts(h, self.prompts)


def add_prompts(model: nn.Module, count: int, seed: int) -> nn.Module:
    """Give a packaged ``vit`` ``count`` seeded prompt tokens (its parameter
    ``prompts``, inserted by its ``embed``); returns the same model."""
    patch = model.get_submodule("patch_embed")
    assert isinstance(patch, nn.Linear)
    initial = init_prompts(
        count, patch.out_features, patch.in_features, derive_seed(seed, "prompts")
    )
    model.prompts = nn.Parameter(initial.to(patch.weight.device))
    return model
