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
sampled client holds keep their value. As in the reference code
(:class:`fedsim.learn.capacity.WidthHooks`):

- Scaler (``strategy.scaler``, on by default as the reference's ``scale: 1``):
  while training, every hidden layer's output is divided by the client's
  width ratio (``Scaler(rate)`` after each conv); evaluation is unscaled.
- Label-split masking (``strategy.mask``, on by default as the reference's
  ``mask: 1``): each client's label split is the set of classes in its train
  split; its logits of other classes are set to 0 in local training and in
  its own evaluation, it sends its label split with its train reply (record
  ``label-split``), and the server averages each row of the ``head`` (weight
  and bias) over the clients whose label split holds that class.

The global model is evaluated at full width on the held-out test set, and so
is its slice at every smaller width of ``strategy.capacities`` (server rows
``accuracy-w<r>`` / ``loss-w<r>``: the reference's global test of each model
rate; unscaled, unmasked). In the evaluate phase each client evaluates its own
(masked) slice of the global model on its local test split (the reference's
"Local" metric), so per-client rows show what each capacity gets. Train
replies carry ``width``, ``params`` (parameter count of the sub-model) and
``memory-mb`` (parameters, gradients, momentum and one batch of activations,
counted by :func:`fedsim.learn.capacity.training_memory_bytes`); bytes up/down
are recorded per client by the engine.

Deviations from the paper / reference code:

- No static batch norm: the packaged models have no norm layers (without the
  scaler, a sub-model is exactly the full model with the missing units
  zeroed; a test checks it).
- The label split is the classes present in the client's train split,
  whatever the partitioner (the reference derives it the same way for IID
  splits, and from its shard assignment for non-IID ones).
- Clients are assigned a fixed ratio by partition id (the reference's "fix"
  mode); the reference's "dynamic" mode (a new ratio every round) is not
  implemented.

Message contract (keys from :mod:`fedsim.core.messages`):

- ``train`` down: ``arrays`` (the global model's leading blocks at the node's
  width, same names as the full state dict), ``config`` (``server-round``).
- ``train`` up: ``arrays`` (the trained sub-model, the names and shapes sent
  down), ``metrics`` (``loss``, ``num-examples``, ``width``, ``params``,
  ``memory-mb``), with ``strategy.mask`` ``label-split`` (a config record:
  ``label-split``, the client's classes).
- ``evaluate`` down: ``arrays`` (the node's slice of the global model),
  ``config``.
- ``evaluate`` up: ``metrics`` (``loss``, ``accuracy``, ``num-examples``,
  ``width``; ``robust-loss``, ``robust-accuracy`` when ``robust.epsilon`` > 0).
"""

from dataclasses import dataclass

from fedsim.core.capacity import capacities_option
from fedsim.core.family import Family
from fedsim.core.schema import option


@dataclass(frozen=True)
class Options:
    """HeteroFL's keys."""

    capacities: tuple[float, ...] = capacities_option()
    scaler: bool = option(
        True, "divide hidden outputs by the width ratio while training (reference)"
    )
    mask: bool = option(
        True, "label-split masking of the head in training and aggregation (reference)"
    )


FAMILY = Family(
    name="heterofl",
    summary="HeteroFL (Diao et al., 2021): width-sliced sub-models per client "
    "capacity, scaler and label-split masking; each entry averaged over the "
    "clients that hold it",
    server="fedsim.strategies.heterofl.server:build",
    client="fedsim.clients.heterofl:HeteroFLClient",
    options=Options,
    check="fedsim.learn.capacity:check_sliceable",
    server_metrics="fedsim.strategies.heterofl.server:width_metrics",
)
