"""FedIT's maths, pure numpy: the elementwise (zero-padded) average of LoRA A
and B and the global adapters it keeps (a client's slice of them,
:func:`fedsim.learn.lora.client_adapters`, is the client side's)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedsim.strategies.flora.maths import Adapters, adapter_pairs, client_weights


def average_lora(
    adapters: Adapters, weights: Sequence[float], *, rank: int = 0
) -> dict[str, np.ndarray]:
    """Elementwise weighted average of LoRA A and B (FedIT); inexact.

    Parameters
    ----------
    adapters : sequence of mappings
        One mapping per client from PEFT parameter names to arrays; A and B are
        found by the ``lora_A`` / ``lora_B`` components of the names, other
        entries are ignored.
    weights : sequence of float
        Non-negative client weights, normalised here to p_k.
    rank : int, optional
        Pad to at least this rank (the run's largest), so that the global
        adapters keep their shape in a round only low-rank clients train.

    Returns
    -------
    dict of str to ndarray
        Per adapted module, under the clients' names, ``sum_k p_k A_k`` and
        ``sum_k p_k B_k``. Clients of lower rank are zero-padded to the largest
        rank R (of the clients and ``rank``) first (A to ``R x d_in`` with zero
        rows, B to ``d_out x R`` with zero columns). The product of the
        averages is *not* the average of the products ``sum_k p_k B_k A_k``
        unless all clients share their factors.
    """
    pairs = adapter_pairs(adapters)
    p = client_weights(weights, len(adapters))
    out: dict[str, np.ndarray] = {}
    for a_key, b_key in pairs.values():
        top = max(rank, *(np.shape(ad[a_key])[0] for ad in adapters))
        a_sum = sum(
            pk * _pad(np.asarray(ad[a_key]), top, axis=0) for pk, ad in zip(p, adapters)
        )
        b_sum = sum(
            pk * _pad(np.asarray(ad[b_key]), top, axis=1) for pk, ad in zip(p, adapters)
        )
        out[a_key], out[b_key] = np.asarray(a_sum), np.asarray(b_sum)
    return out


def _pad(x: np.ndarray, size: int, *, axis: int) -> np.ndarray:
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return np.pad(x, widths)


def fold_scalings(
    adapters: Adapters, scalings: Sequence[float]
) -> list[dict[str, np.ndarray]]:
    """Each client's adapters with its scaling folded into B (``s_k B_k``), so
    that its update is ``B A`` at scaling 1 whatever its rank and alpha."""
    b_keys = {b_key for _, b_key in adapter_pairs(adapters).values()}
    return [
        {k: v * s if k in b_keys else v for k, v in adapter.items()}
        for adapter, s in zip(adapters, scalings)
    ]


def global_adapters(
    adapters: Adapters,
    weights: Sequence[float],
    scalings: Sequence[float],
    *,
    rank: int,
) -> dict[str, np.ndarray]:
    """FedIT's global adapters after one round: ``A = sum_k p_k A_k`` and
    ``B = sum_k p_k s_k B_k`` (zero-padded to ``rank``), at scaling 1.

    With equal scalings s this is FedIT's ``s (sum_k p_k B_k)(sum_k p_k A_k)``;
    with mixed ones each client's B keeps its own scale.
    """
    return average_lora(fold_scalings(adapters, scalings), weights, rank=rank)
