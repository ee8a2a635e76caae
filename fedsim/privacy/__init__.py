"""Privacy mechanisms: what wraps a client's local training, and the server.

- ``none`` (:class:`fedsim.privacy.base.NoPrivacy`): plain local training.
- ``dp-sgd`` (:mod:`fedsim.privacy.dp_sgd`): sample-level DP with Opacus in every
  client; the server side is :mod:`fedsim.privacy.budget`.
- ``dp-fedavg`` (:mod:`fedsim.privacy.dp_fedavg`): client-level DP, clipping and
  noise on the server (fixed or adaptive clipping).

:mod:`fedsim.privacy.accounting` holds the pure epsilon functions. Which families
run under which mechanism is the family's declaration (``Family.privacy``); the
functions below dispatch on ``privacy.mechanism`` through the registry.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Any

from fedsim.core import registry
from fedsim.core.experiment import Experiment

if TYPE_CHECKING:
    from fedsim.learn.training import Mechanism
    from fedsim.privacy.base import NoPrivacy


def mechanism_class(experiment: Experiment) -> type[NoPrivacy]:
    """The class registered for ``privacy.mechanism``."""
    return registry.PRIVACY[experiment.privacy.mechanism].load()  # type: ignore[no-any-return]


@lru_cache(maxsize=2)
def client_mechanism(experiment: Experiment) -> Mechanism:
    """The client-side mechanism of ``privacy.mechanism`` (one per process)."""
    return mechanism_class(experiment)(experiment)


def wrap_strategy(strategy: Any, experiment: Experiment) -> Any:
    """The strategy the ServerApp runs under ``privacy.mechanism``."""
    return mechanism_class(experiment).wrap_strategy(strategy, experiment)


def preflight(experiment: Experiment, model: Any, data: Any) -> None:
    """Privacy checks before any training (raises ConfigError)."""
    mechanism_class(experiment).preflight(experiment, model, data)


def summary_fields(experiment: Experiment) -> dict[str, Any]:
    """Entries ``privacy.mechanism`` adds to ``summary.json`` (e.g. dp-fedavg's
    ``accounting``)."""
    return mechanism_class(experiment).summary_fields(experiment)
