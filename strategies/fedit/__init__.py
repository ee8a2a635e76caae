"""FedIT: Zhang et al., "Towards Building the Federated GPT: Federated Instruction
Tuning" (ICASSP 2024), the FedAvg-of-adapters baseline of the FLoRA paper; and
``fedit-merge``, the same averaging inside FLoRA's merge-and-restart round.

``fedit`` (as published). The server keeps one global pair of LoRA factors per
adapted layer; clients continue training them. Round 1: each client k starts
its own adapters, A_k drawn from a generator seeded by the run seed and its
partition id (independent across clients, ``strategy.a-init = "per-client"``;
``"shared"`` gives every client the same A, as the reference's homogeneous path
does by starting all clients from one global PEFT model), B_k = 0. After every
round the server averages A and B separately by example counts,
A = sum_k p_k A_k and B = sum_k p_k s_k B_k (s_k = lora_alpha_k / r_k folded into
B; with one alpha and one rank this is FedIT's s (sum p_k B_k)(sum p_k A_k)),
clients of lower rank zero-padded to the run's largest rank (the reference's
heterogeneous FedIT). The next round each client continues from the global
factors: a rank-r_k client takes the first r_k rows of A and columns of B, B
divided by its s_k (HetLoRA-style truncation). The base weights never change;
the global model (evaluated, exported) is W0 + B A, and the modules trained in
full are averaged by example counts. The applied product of averages carries
cross terms B_j A_k: ``aggregation-error`` measures it against the exact
sum_k p_k s_k B_k A_k of the clients' products.

``fedit-merge``: the previous rule, kept for comparison. The same averaged
product is merged into the weights (W <- W + B A) and every client starts fresh
adapters each round from one A shared by the round (FLoRA's round, see
:mod:`fedsim.strategies.flora`), so it differs from ``flora`` in the
aggregation rule alone.

Deviations from the reference code (ATP-1010/FederatedLLM, ``stacking=False``):

- the reference's homogeneous path runs all clients on one shared PEFT model, so
  they share A's initialisation; ``fedit`` draws A per client unless
  ``strategy.a-init = "shared"``;
- the reference's heterogeneous path builds fresh adapters for every client
  every round from the base and pads, which discards the averaged factors
  between rounds (its ``set_peft_model_state_dict`` targets the unwrapped base);
  here the averaged factors are kept and truncated to each client's rank;
- weights are example counts, A and B are paired by name, never by shape.

Message contract of ``fedit`` (keys from :mod:`fedsim.core.messages`, array names
from :mod:`fedsim.learn.lora`):

- ``train`` down: ``arrays`` with the parameters trained in full and, after the
  first round, the global ``<module>.lora_A.weight`` (``R x d_in``) and
  ``<module>.lora_B.weight`` (``d_out x R``, scaling 1) of every adapted layer;
  the adapted layers' base weights are not sent (they never change: every
  client process builds the same base).
- ``train`` up: as FLoRA's (the client's ``r_k``-rank factors, the fully trained
  parameters, ``lora-rank``, ``lora-scaling``, ``num-examples``).
- ``evaluate`` down / up: as FLoRA's (the dense merged weights W0 + B A).

``fedit-merge``'s contract is exactly FLoRA's.
"""

from dataclasses import dataclass

from fedsim.core.family import Family
from fedsim.core.schema import one_of, option
from fedsim.learn.lora import client_adapters
from fedsim.strategies.fedit.maths import average_lora, global_adapters

__all__ = [
    "FAMILIES",
    "FEDIT",
    "FEDIT_MERGE",
    "average_lora",
    "client_adapters",
    "global_adapters",
]

_REJECTS = {
    "dp-fedavg": "it exchanges LoRA adapters while the server keeps the whole "
    "model, so the update Flower's wrapper clips is not what the server "
    "releases"
}


@dataclass(frozen=True)
class Options:
    """``fedit``'s keys (``strategy.<key>``)."""

    a_init: str = option(
        "per-client",
        "round-1 LoRA A of each client: 'per-client' (seeded by the partition id) "
        "or 'shared' (one A for every client)",
        one_of("per-client", "shared"),
    )


FEDIT = Family(
    name="fedit",
    summary="FedIT (Zhang et al., 2024): clients continue the averaged LoRA A and "
    "B (zero-padded ranks)",
    server="fedsim.strategies.fedit.server:build",
    client="fedsim.clients.fedit:FedITClient",
    options=Options,
    peft=("lora",),
    privacy=("none", "dp-sgd"),
    rejects=_REJECTS,
    check="fedsim.learn.lora:check_layout",
    server_state=True,
)

FEDIT_MERGE = Family(
    name="fedit-merge",
    summary="FedIT's averaging of LoRA A and B in FLoRA's round (merge into the "
    "weights, fresh adapters every round)",
    server="fedsim.strategies.fedit.server:build_merge",
    client="fedsim.clients.lora:LoraClient",
    peft=("lora",),
    privacy=("none", "dp-sgd"),
    rejects=_REJECTS,
    check="fedsim.learn.lora:check_layout",
    audit="fedsim.audit.replay:lora_factors",
)

FAMILIES = (FEDIT, FEDIT_MERGE)
