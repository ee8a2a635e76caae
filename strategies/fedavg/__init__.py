"""FedAvg: McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data" (AISTATS 2017).

Message contract (keys from :mod:`fedsim.core.messages`):

- ``train`` down: ``arrays`` (global state dict), ``config`` (``server-round``).
- ``train`` up: ``arrays`` (local state dict after training), ``metrics``
  (``loss``, ``num-examples``; the server weights by ``num-examples``).
- ``evaluate`` down: ``arrays``, ``config``.
- ``evaluate`` up: ``metrics`` (``loss``, ``accuracy``, ``num-examples``).
"""

from fedsim.core.family import Family

FAMILY = Family(
    name="fedavg",
    summary="FedAvg (McMahan et al., 2017): example-weighted average of full models",
    server="fedsim.strategies.fedavg.server:build",
    client="fedsim.clients.full:FullModelClient",
    privacy=("none", "dp-sgd", "dp-fedavg"),
    audit="fedsim.audit.replay:full_model",
)
