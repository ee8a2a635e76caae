"""FedAvg: McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data" (AISTATS 2017).

Message contract (keys from :mod:`fedsim.core.messages`):

- ``train`` down: ``arrays`` (global state dict), ``config`` (``server-round``).
- ``train`` up: ``arrays`` (local state dict after training), ``metrics``
  (``loss``, ``num-examples``; the server weights by ``num-examples``).
- ``evaluate`` down: ``arrays``, ``config``.
- ``evaluate`` up: ``metrics`` (``loss``, ``accuracy``, ``num-examples``).

Personalised evaluation (``strategy.finetune-epochs`` E > 0, "FedAvg-FT"): each
evaluating client trains the received global model E epochs on its own train
split before evaluating it on its test split
(:class:`fedsim.clients.full.FineTunedEvaluationClient`); with E =
``train.epochs`` that is each client's locally trained model. The server-side
evaluation of the global model is unchanged. It needs ``privacy.mechanism =
"none"``: the fine-tuning is outside any privacy accounting.
"""

from dataclasses import dataclass
from typing import Any

from fedsim.core.errors import ConfigError
from fedsim.core.family import Family
from fedsim.core.schema import at_least, option


@dataclass(frozen=True)
class Options:
    """``fedavg``'s keys (``strategy.<key>``)."""

    finetune_epochs: int = option(
        0,
        "personalised evaluation: epochs each evaluating client trains the global "
        "model on its train split before evaluating it; 0: the global model as is",
        at_least(0),
    )


def check(experiment: Any, model: Any, data: Any) -> None:
    """Fine-tuned evaluation runs outside the privacy mechanism's accounting."""
    opts = experiment.strategy.options
    if opts.finetune_epochs > 0 and experiment.privacy.mechanism != "none":
        raise ConfigError(
            "strategy.finetune-epochs: personalised evaluation trains on private "
            "data outside privacy accounting; set it to 0 or privacy.mechanism = "
            "'none'"
        )


FAMILY = Family(
    name="fedavg",
    summary="FedAvg (McMahan et al., 2017): example-weighted average of full models",
    server="fedsim.strategies.fedavg.server:build",
    client="fedsim.clients.full:FineTunedEvaluationClient",
    options=Options,
    privacy=("none", "dp-sgd", "dp-fedavg"),
    check="fedsim.strategies.fedavg:check",
    audit="fedsim.audit.replay:full_model",
)
