"""FedPer: Arivazhagan et al., "Federated Learning with Personalization Layers"
(arXiv 1912.00818, 2019): the base (body) layers are trained by all clients and
averaged as in FedAvg; the personalization layers (here the model's ``head``
module, as HyperFL's private head) stay on each client and are never sent.

A comparator for the personalised families (HyperFL): the same private head,
with a shared body instead of a hypernetwork. Each client's head starts from
the run's initial model and lives in its ``context.state``. There is no single
global model (every client's model has its own head): evaluation is each
client's body-plus-own-head on its local test split (the headline is the
example-weighted mean), as for HyperFL and local-only training.

Deviations: the paper's personalization layers are the last fully connected
layers, chosen per experiment; here exactly the ``head`` module (the models
built in fedsim end in one).

Message contract (keys from :mod:`fedsim.core.messages`):

- ``train`` down: ``arrays`` (the averaged body: every state-dict key outside
  ``head``), ``config`` (``server-round``).
- ``train`` up: ``arrays`` (the client's body after training), ``metrics``
  (``loss``, ``num-examples``: the weight).
- ``evaluate`` down: ``arrays`` (the body), ``config``.
- ``evaluate`` up: ``metrics`` (``loss``, ``accuracy``, ``num-examples``).
"""

from typing import Any

from fedsim.core.errors import ConfigError
from fedsim.core.family import Family


def check(experiment: Any, model: Any, data: Any) -> None:
    """The model has a ``head`` module to keep private, and a body to share."""
    names = [n for n, _ in model.named_parameters()]
    head = [n for n in names if n.startswith("head.")]
    if not head or len(head) == len(names):
        raise ConfigError(
            f"model.name: FedPer keeps the model's 'head' module private; "
            f"{experiment.model.name!r} has "
            + ("no 'head' module" if not head else "nothing outside its head")
        )


FAMILY = Family(
    name="fedper",
    summary="FedPer (Arivazhagan et al., 2019): FedAvg of the body; each client "
    "keeps its own head",
    server="fedsim.strategies.fedper.server:build",
    client="fedsim.clients.fedper:FedPerClient",
    privacy=("none",),
    global_model=False,
    rejects={
        "dp-sgd": "not implemented for FedPer's private head",
        "dp-fedavg": "not implemented for FedPer's partial model",
    },
    check="fedsim.strategies.fedper:check",
    server_state=True,
)
