"""Local-only training: the baseline without federation.

Each client trains the experiment's model on its own data and keeps it, in its
``context.state``, across rounds; nothing is aggregated. Every client starts
from the run's initial model (the one FedAvg's round 1 starts from), so a table
of FedAvg, HyperFL and local-only compares the same starting point. Evaluation
is personalised: each client's own model on its local test split; the headline
is the example-weighted mean (no global model, no server-side evaluation).
A round is FedAvg's shape with empty arrays, so the clients sampled to train
(``federation.fraction-train``) and to evaluate are drawn as for FedAvg.

Message contract (keys from :mod:`fedsim.core.messages`):

- ``train`` down: ``arrays`` (empty), ``config`` (``server-round``).
- ``train`` up: ``metrics`` (``loss``, ``num-examples``); no arrays.
- ``evaluate`` down: ``arrays`` (empty), ``config``.
- ``evaluate`` up: ``metrics`` (``loss``, ``accuracy``, ``num-examples``).
"""

from fedsim.core.family import Family

FAMILY = Family(
    name="local",
    summary="local-only baseline: each client trains its own model, nothing is shared",
    server="fedsim.strategies.local.server:build",
    client="fedsim.clients.local:LocalClient",
    global_model=False,
)
