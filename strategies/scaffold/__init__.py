"""SCAFFOLD: Karimireddy, Kale, Mohri, Reddi, Stich and Suresh, "SCAFFOLD:
Stochastic Controlled Averaging for Federated Learning" (ICML 2020),
Algorithm 1 with option II; reference: pfl-research's ``SCAFFOLD``
(``pfl/algorithm/scaffold.py``).

Round ``t``: the server samples ``S`` (FedAvg's sampling) and sends ``x`` and
its control variate ``c``. Client ``i`` (control variate ``c_i``, 0 at first,
kept in its ``context.state`` so it survives ``--resume`` and travels with
the client) runs ``K`` local SGD steps ``y <- y - eta_l (g_i(y) - c_i + c)``
(the correction enters the one training loop as the penalty ``<y, c - c_i>``,
whose gradient is ``c - c_i``), then sets ``c_i+ = c_i - c + (x - y_i) / (K
eta_l)`` (option II) and replies ``y_i`` and ``c_i+ - c_i``. The server sets
``x += eta_g mean_S(y_i - x)`` and ``c += (1/N) sum_S (c_i+ - c_i)`` (``N`` =
``federation.clients``: partial participation as in the paper). ``eta_g`` is
``strategy.server-lr``; ``eta_l`` is ``train.lr``; ``K`` the steps the client
took.

Composition:

- DP-SGD: sound. The correction depends on the parameters and on ``c``,
  ``c_i`` (post-processing of earlier private rounds), not on this round's
  data: its gradient is added after Opacus clips and noises
  (:func:`fedsim.privacy.dp_sgd.penalty_after_noise`); ``K`` counts the
  noise-only steps of empty Poisson batches.
- DP-FedAvg: refused. The clients also upload ``c_i+ - c_i``, a scaled copy
  of their model update, which the DP-FedAvg chain neither clips nor noises,
  and the chain replaces the server's update by its own mean.
- Audit: refused (no surface). The server-side replay would have to know
  each client's ``c_i``; the surface for it is not written.
- ``train.optimizer`` must be ``sgd`` with ``train.momentum = 0`` (option II
  assumes plain SGD steps; exit 2 otherwise).

Deviations from the paper:

- A client whose reply has ``num-examples`` 0 (it took no step, e.g. DP-SGD
  budget spent) is left out of ``S`` for the update (its ``c_i`` unchanged).
- ``c`` and ``c_i`` cover the trainable parameters; other state-dict entries
  (none in the packaged models) are averaged like the parameters.

Message contract (keys from :mod:`fedsim.core.messages`):

- ``train`` down: ``arrays`` (``x``, the global state dict), ``control``
  (``c``, one array per trainable parameter), ``config`` (``server-round``).
- ``train`` up: ``arrays`` (``y_i``), ``control`` (``c_i+ - c_i``),
  ``metrics`` (``loss``, ``num-examples``).
- ``evaluate``: FedAvg's.
"""

from dataclasses import dataclass

from fedsim.core.family import Family
from fedsim.core.schema import option, positive


@dataclass(frozen=True)
class Options:
    """SCAFFOLD's keys."""

    server_lr: float = option(1.0, "global step size eta_g", positive)


FAMILY = Family(
    name="scaffold",
    summary="SCAFFOLD (Karimireddy et al., 2020, option II): control variates "
    "correct the clients' drift",
    server="fedsim.strategies.scaffold.server:build",
    client="fedsim.clients.scaffold:ScaffoldClient",
    options=Options,
    privacy=("none", "dp-sgd"),
    rejects={
        "dp-fedavg": "SCAFFOLD's clients also upload control variate updates "
        "(a scaled copy of their model update) that the DP-FedAvg chain neither "
        "clips nor noises",
    },
    check="fedsim.strategies.scaffold.server:check",
    server_state=True,
)
