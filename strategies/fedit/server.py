"""FedIT's servers (see :mod:`fedsim.strategies.fedit`): ``fedit`` keeps global
LoRA factors that clients continue; ``fedit-merge`` merges their averaged
product into the weights in FLoRA's round."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedsim.learn.lora import lora_layout, max_rank
from fedsim.protocol.setup import ServerSetup
from fedsim.strategies.fedit.maths import average_lora, fold_scalings, global_adapters
from fedsim.strategies.flora.maths import Adapters, adapter_pairs, lora_update
from fedsim.strategies.flora.server import FLoRA


class FedITMerge(FLoRA):
    """``fedit-merge``: FLoRA's round with separately averaged A and B.

    The scaling s_k is folded into B_k before averaging, so that clients of
    equal rank get FedIT's ``s (sum_k p_k B_k)(sum_k p_k A_k)`` and clients of
    different ranks keep their own scale. Parameters as for
    :class:`fedsim.strategies.flora.server.FLoRA`.
    """

    def combine(
        self, adapters: Adapters, weights: Sequence[float], scalings: Sequence[float]
    ) -> dict[str, np.ndarray]:
        """Per adapted module, the product of the averaged (zero-padded) factors."""
        averaged = average_lora(fold_scalings(adapters, scalings), weights)
        return {
            module: lora_update(averaged[a_key], averaged[b_key])
            for module, (a_key, b_key) in adapter_pairs(adapters).items()
        }


class FedIT(FLoRA):
    """``fedit``: clients continue the global factors, the averages of theirs.

    Parameters
    ----------
    base : mapping of str to Array
        ``<module>.weight`` of every adapted layer in the initial model (W0):
        FedIT never changes them, the global model is W0 + B A.
    rank : int
        The run's largest rank R: the global factors are ``R x d_in`` and
        ``d_out x R`` (lower ranks zero-padded).
    **kwargs
        As for :class:`fedsim.strategies.flora.server.FLoRA`.
    """

    def __init__(self, *, base: Mapping[str, Array], rank: int, **kwargs: Any):
        super().__init__(**kwargs)
        missing = [k for k in (f"{m}.weight" for m in self.adapted) if k not in base]
        if missing:
            raise KeyError(f"base lacks the adapted weight {missing[0]!r}")
        self.base = {f"{m}.weight": base[f"{m}.weight"] for m in self.adapted}
        self.rank = rank
        #: The global factors (A ``R x d_in``, B ``d_out x R``, scaling 1) clients
        #: continue; empty before the first aggregation.
        self.shared: dict[str, np.ndarray] = {}
        self._pending: dict[str, np.ndarray] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample clients; send the fully trained modules and the global factors
        (none before the first aggregation)."""
        self._global = arrays
        down = {k: arrays[k] for k in self.trained}
        # the factors travel in the dtype of the weights they adapt (the wire's)
        dtype = (
            next(iter(self.base.values())).numpy().dtype if self.base else np.float32
        )
        down.update({k: Array(v.astype(dtype)) for k, v in self.shared.items()})
        return FedAvg.configure_train(
            self, server_round, ArrayRecord(array_dict=down), config, grid
        )

    def combine(
        self, adapters: Adapters, weights: Sequence[float], scalings: Sequence[float]
    ) -> dict[str, np.ndarray]:
        """The new global factors' product ``B A`` per adapted module; the factors
        become the state :meth:`merge` commits."""
        self._pending = global_adapters(adapters, weights, scalings, rank=self.rank)
        return {
            module: lora_update(self._pending[a_key], self._pending[b_key])
            for module, (a_key, b_key) in adapter_pairs(adapters).items()
        }

    def merge(
        self, global_arrays: ArrayRecord, contents: Sequence[RecordDict]
    ) -> tuple[ArrayRecord, float]:
        """The global model W0 + B A of the new factors (modules trained in full
        averaged) and the aggregation error; the factors are kept for the next
        round."""
        start = ArrayRecord(array_dict={**dict(global_arrays.items()), **self.base})
        arrays, error = super().merge(start, contents)
        self.shared, self._pending = self._pending, {}
        return arrays, error

    # -- resume (see fedsim.engine.server.resume_checkpoint) ---------------------
    def checkpoint_state(self) -> dict[str, Any]:
        """The global factors."""
        return {"shared": dict(self.shared)}

    def restore_state(self, state: dict[str, Any]) -> None:
        """Continue from checkpointed global factors."""
        self.shared = {k: np.asarray(v) for k, v in state["shared"].items()}


def build(setup: ServerSetup) -> FedIT:
    """``fedit`` over the LoRA layout of the engine's model, sampling as
    ``[federation]`` says."""
    layout = lora_layout(setup.model, setup.experiment.peft)
    return FedIT(
        adapted=layout.adapted,
        trained=layout.trained,
        base=dict(setup.initial.items()),
        rank=max_rank(setup.experiment.peft),
        **setup.fedavg_options(),
    )


def build_merge(setup: ServerSetup) -> FedITMerge:
    """``fedit-merge`` over the LoRA layout of the engine's model."""
    layout = lora_layout(setup.model, setup.experiment.peft)
    return FedITMerge.from_layout(layout, **setup.fedavg_options())
