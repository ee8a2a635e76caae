"""FLoRA's server: a Flower ``FedAvg`` that stacks the replies' adapters and merges
them into the global model (see :mod:`fedsim.strategies.flora` for the paper and the
message contract, :mod:`fedsim.strategies.flora.maths` for the maths)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Self

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedsim.core.messages import (
    ARRAYS,
    LORA_SCALING,
    METRICS,
    NUM_EXAMPLES,
    PARTITION_ID,
)
from fedsim.flwr_private import valid_replies
from fedsim.learn.lora import LoraLayout, lora_layout, lora_pairs
from fedsim.protocol.setup import ServerSetup, with_message_keys
from fedsim.strategies.flora.maths import (
    AGGREGATION_ERROR,
    Adapters,
    adapter_pairs,
    aggregation_error,
    client_weights,
    exact_update,
    lora_update,
    stack_lora,
)


class FLoRA(FedAvg):
    """FLoRA's server: stacks heterogeneous-rank adapters, merges them into the
    global model, averages the modules trained in full (see the module docstring
    for the paper and the message contract).

    Subclasses change how adapters combine by overriding :meth:`combine` only.

    Parameters
    ----------
    adapted : sequence of str
        Names of the adapted linear modules (``<module>.weight`` are model keys).
    trained : sequence of str
        State-dict keys of the parameters trained in full.
    transposed : sequence of str
        Adapted modules whose weight is ``d_in x d_out`` (``Conv1D``): their
        update is added transposed.
    **kwargs
        Flower ``FedAvg`` options (sampling fractions, minimum nodes...).
    """

    def __init__(
        self,
        *,
        adapted: Sequence[str],
        trained: Sequence[str],
        transposed: Sequence[str] = (),
        **kwargs: Any,
    ):
        super().__init__(**with_message_keys(kwargs))
        if not adapted:
            raise ValueError("adapted: at least one adapted module is required")
        self.adapted = tuple(adapted)
        self.trained = tuple(trained)
        self.transposed = frozenset(transposed)
        self._global: ArrayRecord | None = None

    @classmethod
    def from_layout(cls, layout: LoraLayout, **kwargs: Any) -> Self:
        """The strategy for a resolved :class:`fedsim.learn.lora.LoraLayout`."""
        return cls(
            adapted=layout.adapted,
            trained=layout.trained,
            transposed=layout.transposed,
            **kwargs,
        )

    @property
    def changing(self) -> tuple[str, ...]:
        """Model keys that rounds change: what travels down."""
        return tuple(f"{m}.weight" for m in self.adapted) + self.trained

    def down_arrays(self, arrays: ArrayRecord) -> ArrayRecord:
        """The part of the global model ``arrays`` that is sent to clients."""
        missing = [k for k in self.changing if k not in arrays]
        if missing:
            raise KeyError(f"global model lacks {missing[0]!r}")
        return ArrayRecord(array_dict={k: arrays[k] for k in self.changing})

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample clients; send them the changing part of the global model."""
        self._global = arrays
        return super().configure_train(
            server_round, self.down_arrays(arrays), config, grid
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample clients; send them the changing part of the global model."""
        return super().configure_evaluate(
            server_round, self.down_arrays(arrays), config, grid
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Merge the replies' adapters into the global model sent this round."""
        valid = valid_replies(self, replies)
        if not valid or self._global is None:
            return None, None
        # Replies arrive in any order; a fixed order makes the merged model (its
        # rounding) depend on the seed only.
        valid.sort(key=_reply_order)
        contents = [msg.content for msg in valid]
        arrays, error = self.merge(self._global, contents)
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        metrics[AGGREGATION_ERROR] = error
        return arrays, metrics

    def combine(
        self, adapters: Adapters, weights: Sequence[float], scalings: Sequence[float]
    ) -> dict[str, np.ndarray]:
        """The update applied to each adapted module (module name -> ``d_out x
        d_in``): FLoRA's stacked ``B @ A``."""
        stacked = stack_lora(adapters, weights, scalings)
        return {
            module: lora_update(stacked[a_key], stacked[b_key])
            for module, (a_key, b_key) in lora_pairs(stacked).items()
        }

    def merge(
        self, global_arrays: ArrayRecord, contents: Sequence[RecordDict]
    ) -> tuple[ArrayRecord, float]:
        """The new global model and the aggregation error of one round.

        Parameters
        ----------
        global_arrays : ArrayRecord
            The whole global model the clients trained from.
        contents : sequence of RecordDict
            The successful train replies.
        """
        weights = [float(c[METRICS][NUM_EXAMPLES]) for c in contents]  # type: ignore[arg-type]
        scalings = [float(c[METRICS][LORA_SCALING]) for c in contents]  # type: ignore[arg-type]
        uploads = [
            {k: a.numpy().astype(np.float64) for k, a in c[ARRAYS].items()}  # type: ignore[union-attr]
            for c in contents
        ]
        adapters = [
            {k: v for k, v in up.items() if k not in self.trained} for up in uploads
        ]
        modules = set(adapter_pairs(adapters))
        if modules != set(self.adapted):
            raise ValueError(
                f"replies adapt {sorted(modules)}, expected {sorted(self.adapted)}"
            )
        applied = self.combine(adapters, weights, scalings)
        error = aggregation_error(applied, exact_update(adapters, weights, scalings))
        p = client_weights(weights, len(contents))
        merged: dict[str, Array] = {k: global_arrays[k] for k in global_arrays}
        for module, delta in applied.items():
            key = f"{module}.weight"
            weight = global_arrays[key].numpy()
            if module in self.transposed:  # Conv1D stores d_in x d_out
                delta = delta.T
            merged[key] = Array(
                (weight.astype(np.float64) + delta).astype(weight.dtype)
            )
        for key in self.trained:
            dtype = global_arrays[key].numpy().dtype
            mean = sum(pk * up[key] for pk, up in zip(p, uploads))
            merged[key] = Array(np.asarray(mean).astype(dtype))
        return ArrayRecord(array_dict=merged), error


def _reply_order(msg: Message) -> tuple[float, int]:
    metrics = msg.content[METRICS]
    pid = metrics.get(PARTITION_ID, -1)  # type: ignore[union-attr]
    return float(pid), msg.metadata.src_node_id  # type: ignore[arg-type]


def build(setup: ServerSetup) -> FLoRA:
    """FLoRA over the LoRA layout of the engine's model, sampling as
    ``[federation]`` says."""
    layout = lora_layout(setup.model, setup.experiment.peft)
    return FLoRA.from_layout(layout, **setup.fedavg_options())
