"""FedIT: Zhang et al., "Towards Building the Federated GPT: Federated Instruction
Tuning" (ICASSP 2024), the FedAvg-of-adapters baseline of the FLoRA paper.

FedIT averages LoRA's A and B separately. The applied update is then
(sum_k p_k s_k B_k)(sum_k p_k A_k), not the clients' sum_k p_k s_k B_k A_k: it
carries cross terms B_j A_k (j != k) and wrong weights ("aggregation noise"), and
clients of different ranks only combine after zero-padding to the largest rank
(HetLoRA-style), which makes it worse. The round is otherwise FLoRA's
(:class:`strategies.flora.FLoRA`): the averaged update is merged into the global
model, fully trained modules are averaged by example counts, clients start fresh
adapters on the merged model; only :meth:`FedIT.combine` differs. As every client
of a round draws the same initial A (:func:`fedsim.learn.lora.inject_lora`), its rows
line up across clients, as they do when FedIT clients receive a common adapter.

Message contract: exactly FLoRA's (see :mod:`strategies.flora`), including the
server-side ``aggregation-error`` (here > 0: the noise the averaging adds).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedsim.core.config import Experiment
from strategies.flora import (
    Adapters,
    FLoRA,
    adapter_pairs,
    client_weights,
    layout_of,
    lora_update,
    sampling,
)


def average_lora(adapters: Adapters, weights: Sequence[float]) -> dict[str, np.ndarray]:
    """Elementwise weighted average of LoRA A and B (FedIT); inexact.

    Parameters
    ----------
    adapters : sequence of mappings
        One mapping per client from PEFT parameter names to arrays; A and B are
        found by the ``lora_A`` / ``lora_B`` components of the names, other
        entries are ignored.
    weights : sequence of float
        Non-negative client weights, normalised here to p_k.

    Returns
    -------
    dict of str to ndarray
        Per adapted module, under the clients' names, ``sum_k p_k A_k`` and
        ``sum_k p_k B_k``. Clients of lower rank are zero-padded to the largest
        rank R first (A to ``R x d_in`` with zero rows, B to ``d_out x R`` with
        zero columns). The product of the averages is *not* the average of the
        products ``sum_k p_k B_k A_k`` unless all clients share their factors.
    """
    pairs = adapter_pairs(adapters)
    p = client_weights(weights, len(adapters))
    out: dict[str, np.ndarray] = {}
    for a_key, b_key in pairs.values():
        top = max(np.shape(ad[a_key])[0] for ad in adapters)
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


class FedIT(FLoRA):
    """FedIT's server: FLoRA's round with separately averaged A and B.

    The scaling s_k is folded into B_k before averaging, so that clients of
    equal rank get FedIT's ``s (sum_k p_k B_k)(sum_k p_k A_k)`` and clients of
    different ranks keep their own scale. Parameters as for
    :class:`strategies.flora.FLoRA`.
    """

    def combine(
        self, adapters: Adapters, weights: Sequence[float], scalings: Sequence[float]
    ) -> dict[str, np.ndarray]:
        """Per adapted module, the product of the averaged (zero-padded) factors."""
        pairs = adapter_pairs(adapters)
        b_keys = {b_key for _, b_key in pairs.values()}
        scaled = [
            {k: v * s if k in b_keys else v for k, v in adapter.items()}
            for adapter, s in zip(adapters, scalings)
        ]
        averaged = average_lora(scaled, weights)
        return {
            module: lora_update(averaged[a_key], averaged[b_key])
            for module, (a_key, b_key) in pairs.items()
        }


def build(experiment: Experiment) -> FedIT:
    """FedIT over the experiment's LoRA layout, sampling as ``[federation]`` says."""
    return FedIT.from_layout(layout_of(experiment), **sampling(experiment))
