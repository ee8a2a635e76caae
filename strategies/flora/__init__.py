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

from fedsim.core.family import Family
from fedsim.strategies.flora.maths import (
    AGGREGATION_ERROR,
    adapter_pairs,
    aggregation_error,
    client_weights,
    exact_update,
    lora_update,
    stack_lora,
)

__all__ = [
    "AGGREGATION_ERROR",
    "FAMILY",
    "adapter_pairs",
    "aggregation_error",
    "client_weights",
    "exact_update",
    "lora_update",
    "stack_lora",
]

#: Why client-level DP cannot run with a family that stacks adapters.
DP_FEDAVG_REJECTED = (
    "it stacks the clients' LoRA adapters instead of averaging them, so a clipped "
    "update is not divided among the sampled clients and the noise would not "
    "cover it"
)

FAMILY = Family(
    name="flora",
    summary="FLoRA (Wang et al., 2024): stacks heterogeneous-rank LoRA adapters, "
    "merges them into the base",
    server="fedsim.strategies.flora.server:build",
    client="fedsim.clients.lora:LoraClient",
    peft=("lora",),
    privacy=("none", "dp-sgd"),
    rejects={"dp-fedavg": DP_FEDAVG_REJECTED},
    check="fedsim.learn.lora:check_layout",
    audit="fedsim.audit.replay:lora_factors",
)
