"""FLoRA's maths, pure numpy: stacking heterogeneous-rank LoRA adapters, the exact
update every LoRA aggregation should apply, and the aggregation error.

A and B are paired by name (``lora_A`` / ``lora_B``,
:func:`fedsim.learn.lora.lora_pairs`), never by shape.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from fedsim.learn.lora import lora_pairs

#: Server-side metric of every LoRA strategy (recorded as an aggregated row).
AGGREGATION_ERROR = "aggregation-error"

Adapters = Sequence[Mapping[str, np.ndarray]]


def client_weights(weights: Sequence[float], clients: int) -> np.ndarray:
    """Normalise non-negative client weights to sum to one.

    Raises
    ------
    ValueError
        Wrong count, a negative or non-finite weight, or all weights zero.
    """
    p = np.asarray(weights, dtype=np.float64)
    if p.shape != (clients,):
        raise ValueError(f"expected {clients} weights, got shape {p.shape}")
    if not np.all(np.isfinite(p)) or np.any(p < 0):
        raise ValueError(f"weights must be finite and >= 0, got {p.tolist()}")
    total = p.sum()
    if total <= 0:
        raise ValueError("weights must not all be zero")
    return p / total


def adapter_pairs(adapters: Adapters) -> dict[str, tuple[str, str]]:
    """The (A key, B key) of every adapted module, the same for every client.

    Checks that each client has the same LoRA arrays under the same names, that
    A and B are matrices whose ranks agree (``B.shape[1] == A.shape[0]``), and
    that every client adapts a module with the same ``d_in`` and ``d_out``.

    Raises
    ------
    ValueError
        No clients, no LoRA arrays, or any mismatch above.
    """
    if not adapters:
        raise ValueError("no client adapters to aggregate")
    pairs = lora_pairs(adapters[0].keys())
    if not pairs:
        raise ValueError("adapters hold no lora_A / lora_B arrays")
    for k, adapter in enumerate(adapters):
        if k and lora_pairs(adapter.keys()) != pairs:
            raise ValueError(f"client {k} has other LoRA arrays than client 0")
        for module, (a_key, b_key) in pairs.items():
            a, b = np.shape(adapter[a_key]), np.shape(adapter[b_key])
            if len(a) != 2 or len(b) != 2 or b[1] != a[0]:
                raise ValueError(
                    f"client {k}, {module!r}: A {a} and B {b} are not r x d_in and "
                    "d_out x r"
                )
            a0, b0 = np.shape(adapters[0][a_key]), np.shape(adapters[0][b_key])
            if a[1] != a0[1] or b[0] != b0[0]:
                raise ValueError(
                    f"client {k}, {module!r}: d_in x d_out {a[1]} x {b[0]} differs "
                    f"from client 0's {a0[1]} x {b0[0]}"
                )
    return pairs


def _scalings(scalings: Sequence[float] | None, clients: int) -> np.ndarray:
    if scalings is None:
        return np.ones(clients)
    s = np.asarray(scalings, dtype=np.float64)
    if s.shape != (clients,) or not np.all(np.isfinite(s)):
        raise ValueError(f"expected {clients} finite scalings, got {s.tolist()}")
    return s


def stack_lora(
    adapters: Adapters,
    weights: Sequence[float],
    scalings: Sequence[float] | None = None,
) -> dict[str, np.ndarray]:
    """Stack client LoRA adapters so that B A is their exact weighted sum.

    Parameters
    ----------
    adapters : sequence of mappings
        One mapping per client from PEFT parameter names to arrays. A and B are
        found by the ``lora_A`` / ``lora_B`` components of the names (never by
        shape); other entries (e.g. fully trained modules) are ignored. Ranks may
        differ between clients.
    weights : sequence of float
        Non-negative client weights, normalised here to p_k.
    scalings : sequence of float, optional
        Per-client LoRA scaling s_k (``lora_alpha / r_k``); 1 by default.

    Returns
    -------
    dict of str to ndarray
        Per adapted module, under the clients' names, the stacked A
        (``sum_k r_k x d_in``, rows ``p_k s_k A_k``) and B (``d_out x sum_k r_k``,
        columns ``B_k``), with global scaling 1: ``B @ A == sum_k p_k s_k B_k
        A_k``.
    """
    pairs = adapter_pairs(adapters)
    p = client_weights(weights, len(adapters))
    s = _scalings(scalings, len(adapters))
    out: dict[str, np.ndarray] = {}
    for a_key, b_key in pairs.values():
        out[a_key] = np.concatenate(
            [pk * sk * np.asarray(ad[a_key]) for pk, sk, ad in zip(p, s, adapters)],
            axis=0,
        )
        out[b_key] = np.concatenate([np.asarray(ad[b_key]) for ad in adapters], axis=1)
    return out


def lora_update(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The weight update ``B @ A`` of one adapted linear layer (scaling 1)."""
    return np.asarray(b) @ np.asarray(a)


def exact_update(
    adapters: Adapters,
    weights: Sequence[float],
    scalings: Sequence[float] | None = None,
) -> dict[str, np.ndarray]:
    """The update every LoRA aggregation should apply, per adapted module:
    ``sum_k p_k s_k B_k A_k`` (module name -> ``d_out x d_in`` array)."""
    pairs = adapter_pairs(adapters)
    p = client_weights(weights, len(adapters))
    s = _scalings(scalings, len(adapters))
    return {
        module: sum(
            pk * sk * lora_update(ad[a_key], ad[b_key])
            for pk, sk, ad in zip(p, s, adapters)
        )
        for module, (a_key, b_key) in pairs.items()
    }


def aggregation_error(
    applied: Mapping[str, np.ndarray], exact: Mapping[str, np.ndarray]
) -> float:
    """Relative Frobenius error of ``applied`` against ``exact`` over all modules:
    ``sqrt(sum_m ||applied_m - exact_m||^2 / sum_m ||exact_m||^2)``.

    Zero when both are zero; infinite when only the exact update is zero.
    """
    if set(applied) != set(exact):
        raise ValueError("applied and exact updates cover different modules")
    num = sum(float(np.sum((applied[m] - exact[m]) ** 2)) for m in exact)
    den = sum(float(np.sum(exact[m] ** 2)) for m in exact)
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return math.sqrt(num / den)
