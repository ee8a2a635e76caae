"""FLoRA: Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with
Heterogeneous Low-Rank Adaptations" (NeurIPS 2024).

Every round each sampled client k trains fresh LoRA adapters (A random, B = 0) of
its own rank r_k on the current global model; A_k is ``r_k x d_in``, B_k is
``d_out x r_k``, its scaling is ``s_k = lora_alpha / r_k``. The server stacks them,
A = [p_1 s_1 A_1; ...; p_K s_K A_K] (rows) and B = [B_1, ..., B_K] (columns), so
that B A = sum_k p_k s_k B_k A_k exactly for any mix of ranks (p_k: the clients'
example counts, normalised), merges the update into the global weights
(W <- W + B A) and averages the modules trained in full by example counts. The
next round starts fresh adapters on the merged model.

What travels down: the dense current weights of the adapted layers and the fully
trained modules. Every other weight never changes: it is the initial base, which
each client process builds once (:func:`fedsim.learn.models.build_model`, deterministic
and cached on disk when pre-trained) and keeps resident. So a client that missed
any number of rounds starts from the current global model with one message, and
no client state has to match the server's history. (Stacked factors instead cost
``sum_k r_k (d_in + d_out)`` per adapted layer for every round a client missed,
against ``d_in d_out`` for the dense weight, and need the client to hold exactly
the previous global model; in simulation a client process serves many
partitions, so that does not hold.)

Message contract (keys from :mod:`fedsim.core.messages`; array names from
:mod:`fedsim.learn.lora`):

- ``train`` down: ``arrays`` with ``<module>.weight`` of every adapted layer and
  the parameters of the modules trained in full (``head.weight``, ...), under
  their base state-dict names; ``config`` (``server-round``).
- ``train`` up: ``arrays`` with ``<module>.lora_A.weight`` (``r_k x d_in``) and
  ``<module>.lora_B.weight`` (``d_out x r_k``) of every adapted layer and the
  fully trained parameters; ``metrics`` with ``loss``, ``num-examples`` (the
  weight), ``lora-rank`` (r_k) and ``lora-scaling`` (s_k).
- ``evaluate`` down: ``arrays`` as for ``train``, ``config``.
- ``evaluate`` up: ``metrics`` with ``loss``, ``accuracy``, ``num-examples``.

``aggregate_train`` returns the whole merged model (every state-dict key) and the
clients' averaged metrics plus ``aggregation-error``: the relative Frobenius
error, over all adapted layers together, of the applied update against the exact
sum_k p_k s_k B_k A_k (zero up to rounding for FLoRA).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Self

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedsim.core.config import Experiment
from fedsim.learn.lora import LoraLayout, lora_layout, lora_pairs
from fedsim.core.messages import (
    ARRAYS,
    CONFIG,
    LORA_SCALING,
    METRICS,
    NUM_EXAMPLES,
    PARTITION_ID,
)

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
    **kwargs
        Flower ``FedAvg`` options (sampling fractions, minimum nodes...).
    """

    def __init__(
        self, *, adapted: Sequence[str], trained: Sequence[str], **kwargs: Any
    ):
        kwargs.setdefault("weighted_by_key", NUM_EXAMPLES)
        kwargs.setdefault("arrayrecord_key", ARRAYS)
        kwargs.setdefault("configrecord_key", CONFIG)
        super().__init__(**kwargs)
        if not adapted:
            raise ValueError("adapted: at least one adapted module is required")
        self.adapted = tuple(adapted)
        self.trained = tuple(trained)
        self._global: ArrayRecord | None = None

    @classmethod
    def from_layout(cls, layout: LoraLayout, **kwargs: Any) -> Self:
        """The strategy for a resolved :class:`fedsim.learn.lora.LoraLayout`."""
        return cls(adapted=layout.adapted, trained=layout.trained, **kwargs)

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
        valid, _ = self._check_and_log_replies(list(replies), is_train=True)
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


def layout_of(experiment: Experiment) -> LoraLayout:
    """Resolve the experiment's LoRA targets on its model (raises ConfigError)."""
    from fedsim.learn.data import federated_data
    from fedsim.learn.models import build_model

    data = federated_data(
        experiment.data, experiment.federation.clients, experiment.seed
    )
    model = build_model(experiment.model, data.info, experiment.seed)
    return lora_layout(model, experiment.peft)


def sampling(experiment: Experiment) -> dict[str, Any]:
    """Flower ``FedAvg`` sampling options from ``[federation]``."""
    fed = experiment.federation
    return {
        "fraction_train": fed.fraction_train,
        "fraction_evaluate": fed.fraction_evaluate,
        "min_train_nodes": 1,
        "min_evaluate_nodes": 1,
        "min_available_nodes": fed.clients,
    }


def build(experiment: Experiment) -> FLoRA:
    """FLoRA over the experiment's LoRA layout, sampling as ``[federation]`` says."""
    return FLoRA.from_layout(layout_of(experiment), **sampling(experiment))
