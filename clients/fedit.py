"""FedIT's client (``fedit``, see :mod:`fedsim.strategies.fedit`): continues the
server's global LoRA factors on the unchanged base."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, RecordDict

from fedsim.clients.lora import LoraClient
from fedsim.core.experiment import Experiment
from fedsim.core.messages import ARRAYS
from fedsim.core.seeding import derive_seed
from fedsim.learn.data import DatasetInfo
from fedsim.learn.lora import ADAPTER, client_adapters, lora_pairs, scaling_for


class FedITClient(LoraClient):
    """LoRA training that continues the received global factors.

    The adapted layers keep the initial base W0 (the client restores its own
    copy before loading a message, since evaluation messages carry the merged
    W0 + B A). Before the first aggregation nothing is received and the client
    starts PEFT's fresh adapters: B = 0 and A seeded by the run seed and the
    partition id (``strategy.a-init = "per-client"``) or by the run seed alone
    (``"shared"``). Afterwards it starts from its rank's slice of the global
    factors (:func:`fedsim.learn.lora.client_adapters`). Replies as
    :class:`fedsim.clients.lora.LoraClient`.
    """

    def __init__(self, experiment: Experiment, info: DatasetInfo, device: torch.device):
        super().__init__(experiment, info, device)
        weights = self.base.state_dict()
        self.initial = {k: weights[k].clone() for k in self.layout.adapted_weights}

    def load(self, content: RecordDict) -> None:
        """Restore W0, then overwrite the weights the message carries (the LoRA
        factors are not base weights: :meth:`start` takes them)."""
        self.base.load_state_dict(self.initial, strict=False)
        arrays: Any = content[ARRAYS]
        lora = {k for pair in lora_pairs(arrays.keys()).values() for k in pair}
        kept = {k: v for k, v in arrays.items() if k not in lora}
        super().load(RecordDict({ARRAYS: ArrayRecord(array_dict=kept)}))

    def init_seed(self, partition_id: int, server_round: int) -> int:
        """Round-1 A: per client (its partition id) or one for every client."""
        if self.experiment.strategy.options.a_init == "shared":
            return derive_seed(self.experiment.seed, "fedit-init")
        return derive_seed(self.experiment.seed, "fedit-init", partition_id)

    def start(self, content: RecordDict, rank: int) -> None:
        """Copy this rank's slice of the received global factors into the
        injected adapters (nothing received: keep the fresh ones)."""
        arrays: Any = content[ARRAYS]
        shared = {
            k: arrays[k].numpy() for pair in lora_pairs(arrays).values() for k in pair
        }
        if not shared:
            return
        mine = client_adapters(
            shared, rank=rank, scaling=scaling_for(self.experiment.peft, rank)
        )
        with torch.no_grad():
            for module, (a_key, b_key) in lora_pairs(mine).items():
                layer: Any = self.base.get_submodule(module)
                for factor, key in ((layer.lora_A, a_key), (layer.lora_B, b_key)):
                    weight = factor[ADAPTER].weight
                    weight.copy_(torch.from_numpy(np.asarray(mine[key])).to(weight))
