"""FedIT's server: FLoRA's round with separately averaged A and B (see
:mod:`fedsim.strategies.fedit`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedsim.learn.lora import lora_layout
from fedsim.protocol.setup import ServerSetup
from fedsim.strategies.fedit.maths import average_lora
from fedsim.strategies.flora.maths import Adapters, adapter_pairs, lora_update
from fedsim.strategies.flora.server import FLoRA


class FedIT(FLoRA):
    """FedIT's server: FLoRA's round with separately averaged A and B.

    The scaling s_k is folded into B_k before averaging, so that clients of
    equal rank get FedIT's ``s (sum_k p_k B_k)(sum_k p_k A_k)`` and clients of
    different ranks keep their own scale. Parameters as for
    :class:`fedsim.strategies.flora.FLoRA`.
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


def build(setup: ServerSetup) -> FedIT:
    """FedIT over the LoRA layout of the engine's model, sampling as
    ``[federation]`` says."""
    layout = lora_layout(setup.model, setup.experiment.peft)
    return FedIT.from_layout(layout, **setup.fedavg_options())
