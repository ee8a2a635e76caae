"""FedProx's server: Flower's message-API ``FedAvg`` (see
:mod:`fedsim.strategies.fedprox`; the proximal term is the clients')."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg

from fedsim.protocol.setup import ServerSetup


def build(setup: ServerSetup) -> FedAvg:
    """Flower's message-API FedAvg, sampling from all ``federation.clients``."""
    return FedAvg(**setup.fedavg_options())
