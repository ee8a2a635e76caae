"""FedProx: Li, Sahu, Zaheer, Sanjabi, Talwalkar and Smith, "Federated
Optimization in Heterogeneous Networks" (MLSys 2020); reference code
github.com/litian96/FedProx (``flearn/optimizer/pgd.py``), Flower's and
pfl-research's ``FedProx``.

Each client minimises its loss plus the proximal term ``mu/2 ||w - w_t||^2``
around the received global model ``w_t`` (``strategy.proximal-mu``), through
the one training loop's penalty hook
(:func:`fedsim.clients.full.fit_round`, ``penalty=``); the server is FedAvg's.
With ``mu = 0`` it is FedAvg bit for bit (a test checks it).

Composition:

- DP-SGD: the proximal term depends on the parameters alone, so its gradient
  ``mu (w - w_t)`` is added after Opacus clips and noises the per-example
  gradients (post-processing, no privacy cost;
  :func:`fedsim.privacy.dp_sgd.penalty_after_noise`). Put into the loss it
  would be dropped silently: Opacus replaces the gradient by the noised sum of
  per-example gradients.
- DP-FedAvg: the client's objective is its own business; the server's chain
  clips and noises the uploaded models as for FedAvg.
- Audit: the replay is FedAvg's (:func:`fedsim.audit.replay.full_model`): the
  attacker replays plain local SGD without the proximal term, a slightly
  mis-specified (weaker) attacker for ``mu > 0``.
- LoRA: not offered (``peft.method = "none"``): the family trains full models.
  The penalty hook is there for LoRA clients too, but LoRA clients start fresh
  adapters every round, so a proximal term on the adapters would pull toward
  their random initialisation, not toward the global model.

Deviations from the paper:

- No systems heterogeneity: every client runs its ``train.epochs`` in full
  (the paper also simulates stragglers that do less local work).
- The server averages weighted by ``num-examples`` as fedsim's FedAvg (the
  paper samples clients with probability ``p_k`` and averages uniformly).
- Reported train ``loss`` is the data loss, without the proximal term.

Message contract: FedAvg's (see :mod:`fedsim.strategies.fedavg`); ``mu`` is
part of the experiment every client reads, not sent per message.
"""

from dataclasses import dataclass

from fedsim.core.family import Family
from fedsim.core.schema import non_negative, option


@dataclass(frozen=True)
class Options:
    """FedProx's keys."""

    proximal_mu: float = option(
        0.01, "proximal weight mu: clients add mu/2 ||w - w_global||^2", non_negative
    )


FAMILY = Family(
    name="fedprox",
    summary="FedProx (Li et al., 2020): FedAvg whose clients add a proximal "
    "term mu/2 ||w - w_global||^2",
    server="fedsim.strategies.fedprox.server:build",
    client="fedsim.clients.fedprox:FedProxClient",
    options=Options,
    privacy=("none", "dp-sgd", "dp-fedavg"),
    audit="fedsim.audit.replay:full_model",
)
