"""HeteroFL's server: each node gets the global model's slice at its width; each
entry is averaged over the clients that hold it (see :mod:`fedsim.strategies.heterofl`).

Sampling and the round's shape are FedAvg's (Flower's ``FedAvg`` samples, the
standard round runs); :meth:`HeteroFL.configure_train` and
:meth:`HeteroFL.configure_evaluate` replace the one shared payload of Flower's
messages with each node's own slice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedsim.core.capacity import capacity_of
from fedsim.core.messages import ARRAYS, CONFIG
from fedsim.flwr_private import valid_replies
from fedsim.learn.capacity import (
    HEAD,
    LABEL_SPLIT,
    Plan,
    slice_arrays,
    sub_model,
    width_plan,
)
from fedsim.learn.training import evaluate
from fedsim.protocol.rounds import per_node
from fedsim.protocol.setup import ServerSetup, with_message_keys
from fedsim.strategies.heterofl.maths import aggregate_nested


def numpy_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """An ArrayRecord as numpy arrays."""
    return {k: v.numpy() for k, v in record.items()}


def array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """Numpy arrays as an ArrayRecord."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


class HeteroFL(FedAvg):
    """FedAvg's sampling and round with width-sliced payloads.

    Parameters
    ----------
    plan_of : callable
        Partition id -> that client's :data:`~fedsim.learn.capacity.Plan`.
    mask : bool
        Label-split aggregation: the head's row of a class is averaged over
        the replies whose label split (record ``label-split``) holds it.
    **kwargs
        Flower ``FedAvg`` options (sampling fractions, minimum nodes...).
    """

    def __init__(self, plan_of: Callable[[int], Plan], *, mask: bool, **kwargs: Any):
        super().__init__(**with_message_keys(kwargs))
        self.plan_of = plan_of
        self.mask = mask
        #: The global model the current round's slices were cut from.
        self.current: dict[str, np.ndarray] = {}

    def _sliced(
        self, messages: Iterable[Message], arrays: ArrayRecord, grid: Grid
    ) -> list[Message]:
        full = numpy_arrays(arrays)

        def content(msg: Message, partition_id: int) -> RecordDict:
            own = slice_arrays(full, self.plan_of(partition_id))
            config = ConfigRecord(dict(msg.content[CONFIG]))  # type: ignore[arg-type]
            return RecordDict({ARRAYS: array_record(own), CONFIG: config})

        return per_node(messages, grid, content)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's sample; each node gets its slice of ``arrays``."""
        self.current = numpy_arrays(arrays)
        messages = super().configure_train(server_round, arrays, config, grid)
        return self._sliced(messages, arrays, grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's sample; each node evaluates its slice of ``arrays``."""
        messages = super().configure_evaluate(server_round, arrays, config, grid)
        return self._sliced(messages, arrays, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Each entry of the global model: the mean over the replies holding it."""
        valid = valid_replies(self, replies, validate=False)
        if not valid:
            return None, None
        uploads = [numpy_arrays(msg.content[ARRAYS]) for msg in valid]  # type: ignore[arg-type]
        for msg, up in zip(valid, uploads):
            unknown = set(up) - set(self.current)
            if unknown:
                raise ValueError(
                    f"node {msg.metadata.src_node_id} uploaded arrays the global "
                    f"model does not have: {sorted(unknown)[0]!r}"
                )
        rows = None
        if self.mask:
            rows = [self.head_rows(msg) for msg in valid]
        new = aggregate_nested(self.current, uploads, rows)
        contents = [msg.content for msg in valid]
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        return array_record(new), metrics

    def head_rows(self, msg: Message) -> dict[str, list[int]]:
        """The head rows a reply counts for: its label split."""
        if LABEL_SPLIT not in msg.content:
            raise ValueError(
                f"node {msg.metadata.src_node_id} sent no {LABEL_SPLIT!r} record "
                "(strategy.mask is on)"
            )
        labels = [int(c) for c in msg.content[LABEL_SPLIT][LABEL_SPLIT]]  # type: ignore[union-attr]
        return {f"{HEAD}.weight": labels, f"{HEAD}.bias": labels}


def width_metrics(setup: ServerSetup, arrays: ArrayRecord) -> dict[str, float]:
    """Loss and accuracy on the held-out test set of the global model's slice
    at every width of ``strategy.capacities`` below 1 (``loss-w0.5``,
    ``accuracy-w0.5``...): what each capacity's model gets globally (no scaler,
    no mask: the reference's global evaluation)."""
    full = setup.model
    full.load_state_dict(arrays.to_torch_state_dict())
    out: dict[str, float] = {}
    for ratio in sorted(set(setup.options.capacities)):
        if ratio >= 1.0:
            continue
        stats = evaluate(sub_model(full, ratio), setup.data.test, device=setup.device)
        out[f"loss-w{ratio:g}"] = stats.loss
        out[f"accuracy-w{ratio:g}"] = stats.accuracy
    return out


def plans(model: Any, capacities: Sequence[float]) -> Callable[[int], Plan]:
    """Partition id -> plan, one plan computed per distinct width."""
    table = {r: width_plan(model, r) for r in set(capacities)}
    return lambda pid: table[capacity_of(capacities, pid)]


def build(setup: ServerSetup) -> HeteroFL:
    """HeteroFL over the experiment's model and ``strategy.capacities``."""
    return HeteroFL(
        plans(setup.model, setup.options.capacities),
        mask=setup.options.mask,
        **setup.fedavg_options(),
    )
