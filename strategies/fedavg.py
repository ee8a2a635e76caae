"""FedAvg: McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data" (AISTATS 2017).

Message contract (keys from :mod:`fedsim.core.messages`):

- ``train`` down: ``arrays`` (global state dict), ``config`` (``server-round``).
- ``train`` up: ``arrays`` (local state dict after training), ``metrics``
  (``loss``, ``num-examples``; the server weights by ``num-examples``).
- ``evaluate`` down: ``arrays``, ``config``.
- ``evaluate`` up: ``metrics`` (``loss``, ``accuracy``, ``num-examples``).
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg

from fedsim.core.config import Experiment
from fedsim.core.messages import ARRAYS, CONFIG, NUM_EXAMPLES


def build(experiment: Experiment) -> FedAvg:
    """Flower's message-API FedAvg, sampling from all ``federation.clients``."""
    fed = experiment.federation
    return FedAvg(
        fraction_train=fed.fraction_train,
        fraction_evaluate=fed.fraction_evaluate,
        min_train_nodes=1,
        min_evaluate_nodes=1,
        min_available_nodes=fed.clients,
        weighted_by_key=NUM_EXAMPLES,
        arrayrecord_key=ARRAYS,
        configrecord_key=CONFIG,
    )
