"""The server optimisers' servers: Flower's message-API ``FedAdam``,
``FedYogi``, ``FedAdagrad`` and ``FedAvgM`` (see :mod:`fedsim.strategies.fedopt`),
each with its optimiser state saved in the resume checkpoint."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvgM, FedYogi

from fedsim.protocol.setup import ServerSetup


def _arrays(state: Mapping[str, Any] | None) -> dict[str, np.ndarray] | None:
    return None if state is None else {k: np.asarray(v) for k, v in state.items()}


class _Moments:
    """The resume state of Flower's FedOpt strategies: the moments ``m_t`` and
    ``v_t`` (None before the first aggregation). ``current_arrays`` is set by
    every ``configure_train`` from the round's global arrays, so it needs no
    saving."""

    m_t: dict[str, np.ndarray] | None
    v_t: dict[str, np.ndarray] | None

    def checkpoint_state(self) -> dict[str, Any]:
        """``m`` and ``v`` as named numpy arrays."""
        return {"m": self.m_t, "v": self.v_t}

    def restore_state(self, state: Mapping[str, Any]) -> None:
        """Put back what :meth:`checkpoint_state` saved."""
        self.m_t, self.v_t = _arrays(state["m"]), _arrays(state["v"])


class ServerAdam(_Moments, FedAdam):
    """Flower's ``FedAdam`` with its moments in the resume checkpoint."""


class ServerYogi(_Moments, FedYogi):
    """Flower's ``FedYogi`` with its moments in the resume checkpoint."""


class ServerAdagrad(_Moments, FedAdagrad):
    """Flower's ``FedAdagrad`` with its moments in the resume checkpoint."""


class ServerMomentum(FedAvgM):
    """Flower's ``FedAvgM`` with its momentum in the resume checkpoint.

    ``current_arrays`` (the model the momentum step starts from) is the global
    model after the last round, which a resumed run passes to its first
    ``configure_train``; it is saved too, so the restored strategy needs
    nothing else.
    """

    def checkpoint_state(self) -> dict[str, Any]:
        """The momentum vector and the current arrays, as numpy arrays."""
        current = self.current_arrays
        return {
            "momentum": None
            if self.momentum_vector is None
            else [np.asarray(v) for v in self.momentum_vector],
            "current": None
            if current is None
            else {k: a.numpy() for k, a in current.items()},
        }

    def restore_state(self, state: Mapping[str, Any]) -> None:
        """Put back what :meth:`checkpoint_state` saved."""
        momentum = state["momentum"]
        self.momentum_vector = (
            None if momentum is None else [np.asarray(v) for v in momentum]
        )
        current = state["current"]
        self.current_arrays = (
            None
            if current is None
            else ArrayRecord(
                {k: Array(np.ascontiguousarray(v)) for k, v in current.items()}
            )
        )


def build_fedadam(setup: ServerSetup) -> ServerAdam:
    """Flower's FedAdam, sampling from all ``federation.clients``."""
    o = setup.options
    return ServerAdam(
        **setup.fedavg_options(),
        eta=o.server_lr,
        beta_1=o.beta_1,
        beta_2=o.beta_2,
        tau=o.tau,
    )


def build_fedyogi(setup: ServerSetup) -> ServerYogi:
    """Flower's FedYogi, sampling from all ``federation.clients``."""
    o = setup.options
    return ServerYogi(
        **setup.fedavg_options(),
        eta=o.server_lr,
        beta_1=o.beta_1,
        beta_2=o.beta_2,
        tau=o.tau,
    )


def build_fedadagrad(setup: ServerSetup) -> ServerAdagrad:
    """Flower's FedAdagrad (``beta_1 = 0``), sampling from all
    ``federation.clients``."""
    o = setup.options
    return ServerAdagrad(**setup.fedavg_options(), eta=o.server_lr, tau=o.tau)


def build_fedavgm(setup: ServerSetup) -> ServerMomentum:
    """Flower's FedAvgM, sampling from all ``federation.clients``."""
    o = setup.options
    return ServerMomentum(
        **setup.fedavg_options(),
        server_learning_rate=o.server_lr,
        server_momentum=o.server_momentum,
    )
