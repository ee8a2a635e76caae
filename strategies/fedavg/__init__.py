"""FedAvg: McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data" (AISTATS 2017); with ``strategy.server-optimizer`` the
server treats the negated example-weighted mean update as a pseudo-gradient and
steps with an optimiser (Flower's message-API strategies, their maths unchanged):

- ``"adam"`` / ``"yogi"`` / ``"adagrad"``: FedAdam, FedYogi, FedAdagrad of Reddi
  et al., "Adaptive Federated Optimization" (ICLR 2021), Algorithm 2:
  ``m = b1 m + (1 - b1) D``; ``v`` by Adam (``b2 v + (1 - b2) D^2``), Yogi
  (``v - (1 - b2) D^2 sign(v - D^2)``) or Adagrad (``v + D^2``); ``x += eta m /
  (sqrt(v) + tau)``, where ``D`` is the weighted mean of the clients' updates;
- ``"momentum"``: FedAvgM of Hsu, Qi and Brown, "Measuring the Effects of
  Non-Identical Data Distribution for Federated Visual Classification" (2019):
  ``v = beta v + (x - mean)``; ``x -= eta v``.

The optimiser state (``m``, ``v``; FedAvgM's momentum) is part of the resume
checkpoint.

Deviations from the paper (all Flower's, kept as Flower ships them):

- FedAdagrad has no first-moment averaging (Flower fixes ``b1 = 0``: ``m =
  D``); Algorithm 2 allows ``b1 > 0`` for all three.
- ``v`` (and ``m``) start at 0, not at ``v_{-1} >= tau^2`` (Algorithm 2): in
  round 1 Adam's and Yogi's ``v`` are both ``(1 - b2) D^2``.
- FedAdam's step is bias-corrected as in Kingma and Ba: ``eta_t = eta
  sqrt(1 - b2^(t+1)) / (1 - b1^(t+1))`` with ``t`` the server round (Flower's
  FedAdam); Algorithm 2 has no bias correction. FedYogi and FedAdagrad step
  with ``eta``.
- The mean update is weighted by ``num-examples`` (FedAvg's weighting; the
  paper averages uniformly over the sampled clients).

Message contract (keys from :mod:`fedsim.core.messages`), the same with every
server optimiser:

- ``train`` down: ``arrays`` (global state dict), ``config`` (``server-round``).
- ``train`` up: ``arrays`` (local state dict after training), ``metrics``
  (``loss``, ``num-examples``; the server weights by ``num-examples``).
- ``evaluate`` down: ``arrays``, ``config``.
- ``evaluate`` up: ``metrics`` (``loss``, ``accuracy``, ``num-examples``).
"""

from dataclasses import dataclass

from fedsim.core.family import Family
from fedsim.core.schema import non_negative, one_of, option, positive, rate

#: ``strategy.server-optimizer`` values.
SERVER_OPTIMIZERS = ("none", "adam", "yogi", "adagrad", "momentum")


@dataclass(frozen=True)
class Options:
    """FedAvg's keys: the server optimiser and its hyper-parameters."""

    server_optimizer: str = option(
        "none",
        "server step on the mean update: none (FedAvg), adam, yogi, adagrad "
        "(Reddi et al. 2021), momentum (FedAvgM, Hsu et al. 2019)",
        one_of(*SERVER_OPTIMIZERS),
    )
    server_lr: float = option(
        0.0,
        "server learning rate eta; 0: the optimiser's default (0.1 for adam, "
        "yogi, adagrad as Flower's; 1.0 for momentum)",
        non_negative,
    )
    beta_1: float = option(0.9, "first-moment decay (adam, yogi)", rate)
    beta_2: float = option(0.99, "second-moment decay (adam, yogi)", rate)
    tau: float = option(1e-3, "adaptivity tau (adam, yogi, adagrad)", positive)
    server_momentum: float = option(0.9, "server momentum beta (momentum)", rate)


FAMILY = Family(
    name="fedavg",
    summary="FedAvg (McMahan et al., 2017): example-weighted average of full "
    "models; optional server optimiser (FedAdam/FedYogi/FedAdagrad, FedAvgM)",
    server="fedsim.strategies.fedavg.server:build",
    client="fedsim.clients.full:FullModelClient",
    options=Options,
    privacy=("none", "dp-sgd", "dp-fedavg"),
    check="fedsim.strategies.fedavg.server:check",
    audit="fedsim.audit.replay:full_model",
)
