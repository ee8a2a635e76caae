"""FedAvg's server: Flower's message-API ``FedAvg``, or with
``strategy.server-optimizer`` Flower's ``FedAdam``, ``FedYogi``, ``FedAdagrad``
or ``FedAvgM`` (see :mod:`fedsim.strategies.fedavg`), each with its optimiser
state saved in the resume checkpoint."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedYogi

from fedsim.core.errors import ConfigError
from fedsim.core.experiment import Experiment
from fedsim.protocol.setup import ServerSetup

#: The optimiser's ``server-lr`` when the key is 0 (Flower's defaults).
DEFAULT_LR = {"adam": 0.1, "yogi": 0.1, "adagrad": 0.1, "momentum": 1.0}
#: The keys each server optimiser reads besides ``server-lr``.
READS = {
    "none": (),
    "adam": ("beta_1", "beta_2", "tau"),
    "yogi": ("beta_1", "beta_2", "tau"),
    "adagrad": ("tau",),
    "momentum": ("server_momentum",),
}


#: The optimiser keys of the option table.
KEYS = ("server_lr", "beta_1", "beta_2", "tau", "server_momentum")


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


def server_lr(options: Any) -> float:
    """``strategy.server-lr``, or the optimiser's default when it is 0."""
    return float(options.server_lr or DEFAULT_LR[options.server_optimizer])


def check(experiment: Experiment, model: Any, data: Any) -> None:
    """Refuse settings the chosen server optimiser ignores, and a server
    optimiser under DP-FedAvg (whose chain replaces FedAvg's aggregation)."""
    options = experiment.strategy.options
    name = options.server_optimizer
    defaults = type(options)()
    reads = {"server_lr", *READS[name]} if name != "none" else set()
    ignored = [
        key
        for key in KEYS
        if key not in reads and getattr(options, key) != getattr(defaults, key)
    ]
    if ignored:
        key = ignored[0].replace("_", "-")
        raise ConfigError(
            f"strategy.{key}: strategy.server-optimizer = {name!r} does not use it; "
            f"leave it unset or choose an optimiser that reads it"
        )
    if name != "none" and experiment.privacy.mechanism == "dp-fedavg":
        raise ConfigError(
            f"strategy.server-optimizer: {name!r} does not run under "
            "privacy.mechanism = 'dp-fedavg': its chain replaces FedAvg's "
            "aggregation by the clipped, noised mean, and a server optimiser "
            "stepping on that mean is not implemented; use 'none' or dp-sgd"
        )


def build(setup: ServerSetup) -> FedAvg:
    """Flower's message-API FedAvg (or the chosen server optimiser's strategy),
    sampling from all ``federation.clients``."""
    options, common = setup.options, setup.fedavg_options()
    name = options.server_optimizer
    if name == "none":
        return FedAvg(**common)
    eta = server_lr(options)
    if name == "momentum":
        return ServerMomentum(
            **common, server_learning_rate=eta, server_momentum=options.server_momentum
        )
    adaptive = {"adam": ServerAdam, "yogi": ServerYogi, "adagrad": ServerAdagrad}
    kwargs: dict[str, Any] = {"eta": eta, "tau": options.tau}
    if name != "adagrad":  # Flower's FedAdagrad fixes beta_1 = 0, has no beta_2
        kwargs.update(beta_1=options.beta_1, beta_2=options.beta_2)
    return adaptive[name](**common, **kwargs)  # type: ignore[no-any-return]
