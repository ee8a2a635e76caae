"""Pa3dFL's formulas: self-attention over client embeddings, the plain mean of
the general parameters, the general core's initialisation."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch


def attention_aggregate(
    embeddings: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor
) -> torch.Tensor:
    """Every client's embedding aggregated with all clients' by self-attention.

    ``E' = E + softmax(Q K^T / sqrt(d)) V`` with ``Q = E Wq^T``, ``K = E Wk^T``,
    ``V = E Wv^T`` (rows: clients; ``d``: the key size; the softmax over each
    row).

    Parameters
    ----------
    embeddings : torch.Tensor
        ``(clients, d)``.
    wq, wk, wv : torch.Tensor
        ``(d, d)`` projections (``nn.Linear`` weights).

    Returns
    -------
    torch.Tensor
        ``(clients, d)``.
    """
    q, k, v = embeddings @ wq.T, embeddings @ wk.T, embeddings @ wv.T
    scores = torch.softmax(q @ k.T / math.sqrt(k.shape[1]), dim=1)
    return embeddings + scores @ v


def plain_mean(uploads: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The unweighted mean of every array over ``uploads`` (same keys, shapes)."""
    keys = set(uploads[0])
    if any(set(up) != keys for up in uploads):
        raise ValueError("every upload must carry the same general parameters")
    return {
        k: np.mean(
            [np.asarray(up[k], dtype=np.float64) for up in uploads], axis=0
        ).astype(np.asarray(uploads[0][k]).dtype)
        for k in sorted(keys)
    }


def core_for(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The ``G`` whose ``U @ G @ V`` is closest to ``weight`` in Frobenius norm
    (``pinv(U) W pinv(V)``)."""
    w = weight.reshape(weight.shape[0], -1)
    return torch.linalg.pinv(u) @ w @ torch.linalg.pinv(v)
