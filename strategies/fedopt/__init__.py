"""Server optimisers on FedAvg: the server treats the example-weighted mean
of the clients' updates as a pseudo-gradient and steps with an optimiser
(Flower's message-API strategies, their maths unchanged). Four families:

- ``fedadam`` / ``fedyogi`` / ``fedadagrad``: FedAdam, FedYogi, FedAdagrad of Reddi
  et al., "Adaptive Federated Optimization" (ICLR 2021), Algorithm 2:
  ``m = b1 m + (1 - b1) D``; ``v`` by Adam (``b2 v + (1 - b2) D^2``), Yogi
  (``v - (1 - b2) D^2 sign(v - D^2)``) or Adagrad (``v + D^2``); ``x += eta m /
  (sqrt(v) + tau)``, where ``D`` is the weighted mean of the clients' updates;
- ``fedavgm``: FedAvgM of Hsu, Qi and Brown, "Measuring the Effects of
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

Keys: ``strategy.server-lr`` (``eta``; 0.1 for the adaptive ones as Flower's
default, 1.0 for FedAvgM), ``strategy.beta-1``, ``strategy.beta-2`` (FedAdam,
FedYogi), ``strategy.tau`` (FedAdam, FedYogi, FedAdagrad),
``strategy.server-momentum`` (FedAvgM).

Composition: DP-SGD as FedAvg (the clients are FedAvg's). DP-FedAvg is
refused: its chain replaces FedAvg's aggregation by the clipped, noised mean,
and a server optimiser stepping on that mean (sound: post-processing) is not
implemented. The audit is FedAvg's (the clients' uploads are FedAvg's).

Message contract (keys from :mod:`fedsim.core.messages`): FedAvg's, for all
four:

- ``train`` down: ``arrays`` (global state dict), ``config`` (``server-round``).
- ``train`` up: ``arrays`` (local state dict after training), ``metrics``
  (``loss``, ``num-examples``; the server weights by ``num-examples``).
- ``evaluate`` down: ``arrays``, ``config``.
- ``evaluate`` up: ``metrics`` (``loss``, ``accuracy``, ``num-examples``).
"""

from dataclasses import dataclass

from fedsim.core.family import Family
from fedsim.core.schema import option, positive, rate


def _lr(default: float) -> float:
    return option(default, "server learning rate eta", positive)  # type: ignore[no-any-return]


def _tau() -> float:
    return option(1e-3, "adaptivity tau (eta / (sqrt(v) + tau))", positive)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class AdamOptions:
    """FedAdam's and FedYogi's keys."""

    server_lr: float = _lr(0.1)
    beta_1: float = option(0.9, "first-moment decay b1", rate)
    beta_2: float = option(0.99, "second-moment decay b2", rate)
    tau: float = _tau()


@dataclass(frozen=True)
class AdagradOptions:
    """FedAdagrad's keys."""

    server_lr: float = _lr(0.1)
    tau: float = _tau()


@dataclass(frozen=True)
class MomentumOptions:
    """FedAvgM's keys."""

    server_lr: float = _lr(1.0)
    server_momentum: float = option(0.9, "server momentum beta", rate)


_REJECTS = {
    "dp-fedavg": "its chain replaces FedAvg's aggregation by the clipped, noised "
    "mean; a server optimiser stepping on that mean is not implemented",
}


def _family(name: str, summary: str, options: type) -> Family:
    return Family(
        name=name,
        summary=summary,
        server=f"fedsim.strategies.fedopt.server:build_{name}",
        client="fedsim.clients.full:FullModelClient",
        options=options,
        privacy=("none", "dp-sgd"),
        rejects=_REJECTS,
        audit="fedsim.audit.replay:full_model",
        server_state=True,
    )


#: The four families (the entry points ``fedadam``, ``fedyogi``, ``fedadagrad``
#: and ``fedavgm`` load this).
FAMILIES = (
    _family(
        "fedadam",
        "FedAdam (Reddi et al., 2021): Adam on the mean update (Flower's FedAdam)",
        AdamOptions,
    ),
    _family(
        "fedyogi",
        "FedYogi (Reddi et al., 2021): Yogi on the mean update (Flower's FedYogi)",
        AdamOptions,
    ),
    _family(
        "fedadagrad",
        "FedAdagrad (Reddi et al., 2021): Adagrad on the mean update "
        "(Flower's FedAdagrad)",
        AdagradOptions,
    ),
    _family(
        "fedavgm",
        "FedAvgM (Hsu et al., 2019): server momentum on the mean update "
        "(Flower's FedAvgM)",
        MomentumOptions,
    ),
)
