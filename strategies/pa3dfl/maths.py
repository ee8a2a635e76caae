"""Pa3dFL's formulas: the similarity-attention aggregation of client
embeddings (Eq. 9), the plain mean of the general parameters (Eq. 6)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch


def attention_aggregate(
    encoded: torch.Tensor, temperatures: torch.Tensor
) -> torch.Tensor:
    """Every client's embedding of every layer, aggregated over all clients by
    self-attention (Pa3dFL's Eq. 9).

    ``s_i = E' e'_i`` (the similarities of client ``i``'s encoded embedding
    with every client's), ``e_i^(l) = E'^T softmax(s_i / tau_l)``.

    Parameters
    ----------
    encoded : torch.Tensor
        ``E'``: the encoded embeddings, ``(clients, d)``.
    temperatures : torch.Tensor
        ``tau_l`` of each layer, ``(layers,)``, positive.

    Returns
    -------
    torch.Tensor
        ``(layers, clients, d)``.
    """
    scores = encoded @ encoded.T  # (i, j): e'_j . e'_i
    weights = torch.softmax(scores[None] / temperatures[:, None, None], dim=2)
    return weights @ encoded


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
