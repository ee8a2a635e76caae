"""FedAvg's server: Flower's message-API ``FedAvg`` (see :mod:`strategies.fedavg`)."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg

from fedsim.core.messages import ARRAYS, CONFIG, NUM_EXAMPLES
from fedsim.protocol.setup import ServerSetup


def build(setup: ServerSetup) -> FedAvg:
    """Flower's message-API FedAvg, sampling from all ``federation.clients``."""
    fed = setup.experiment.federation
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
