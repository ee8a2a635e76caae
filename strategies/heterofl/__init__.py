"""HeteroFL: Diao, Ding and Tarokh, "HeteroFL: Computation and Communication
Efficient Federated Learning for Heterogeneous Clients" (ICLR 2021); reference
code github.com/diaoenmao/HeteroFL-Computation-and-Communication-Efficient-
Federated-Learning-for-Heterogeneous-Clients.

Client ``i`` has width ratio ``strategy.capacities[i mod len]``
(:mod:`fedsim.core.capacity`). The server sends it the leading block of every
global parameter at that width (:func:`fedsim.learn.capacity.width_plan`: the
first ``ceil(r * n)`` channels / hidden units of every hidden layer, the full
input of the first layer and the full output of ``head``); the client trains
that sub-model and returns it; the server averages every entry over the clients
that hold it (:func:`fedsim.strategies.heterofl.maths.aggregate_nested`); entries no
sampled client holds keep their value. The global model is evaluated at full
width on the held-out test set; in the evaluate phase each client evaluates its
own slice of the global model on its local test split (so per-client rows show
what each capacity gets). Train replies carry ``width``, ``params`` (parameter
count of the sub-model) and ``memory-mb`` (parameters, gradients, momentum and
one batch of activations, counted by
:func:`fedsim.learn.capacity.training_memory_bytes`); bytes up/down are
recorded per client by the engine.

Deviations from the paper / reference code:

- No "scaler" (the reference divides hidden outputs by the ratio during
  training) and no static batch norm: the packaged models have no norm layers,
  and without the scaler a sub-model is exactly the full model with the missing
  units zeroed (a test checks it).
- No label-split masking of the output layer in non-IID runs (the reference
  masks logits of classes a client does not hold and averages each head row
  over the clients holding that class); here every head row is averaged over
  all holders.
- Clients are assigned a fixed ratio by partition id (the reference's "fix"
  mode); the reference's "dynamic" mode (a new ratio every round) is not
  implemented.

Message contract (keys from :mod:`fedsim.core.messages`):

- ``train`` down: ``arrays`` (the global model's leading blocks at the node's
  width, same names as the full state dict), ``config`` (``server-round``).
- ``train`` up: ``arrays`` (the trained sub-model, the names and shapes sent
  down), ``metrics`` (``loss``, ``num-examples``, ``width``, ``params``,
  ``memory-mb``).
- ``evaluate`` down: ``arrays`` (the node's slice of the global model),
  ``config``.
- ``evaluate`` up: ``metrics`` (``loss``, ``accuracy``, ``num-examples``,
  ``width``; ``robust-loss``, ``robust-accuracy`` when ``robust.epsilon`` > 0).
"""

from dataclasses import dataclass

from fedsim.core.capacity import capacities_option
from fedsim.core.family import Family


@dataclass(frozen=True)
class Options:
    """HeteroFL's keys."""

    capacities: tuple[float, ...] = capacities_option()


FAMILY = Family(
    name="heterofl",
    summary="HeteroFL (Diao et al., 2021): width-sliced sub-models per client "
    "capacity; each entry averaged over the clients that hold it",
    server="fedsim.strategies.heterofl.server:build",
    client="fedsim.clients.heterofl:HeteroFLClient",
    options=Options,
    check="fedsim.learn.capacity:check_sliceable",
)
