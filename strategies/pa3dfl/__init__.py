"""Pa3dFL: Wang, Wang, Peng, Wang and Wang, "Selective Knowledge Sharing for
Personalized Federated Learning Under Capacity Heterogeneity" (arXiv 2405.20589,
2024).

Client ``i`` has width ratio ``strategy.capacities[i mod len]``
(:mod:`fedsim.core.capacity`). Every ``Linear`` / ``Conv2d`` weight of its
width-sliced model (:mod:`fedsim.learn.capacity`) is decomposed
(:mod:`fedsim.learn.decomposed`) as ``W = U @ G @ V``: the general parameters
``G`` (``rank x rank``, ``strategy.rank``) have the same size on every client
and are aggregated by plain (unweighted) averaging; the personal parameters
``U`` (``out_i x rank``) and ``V`` (``rank x in_i``) are sized to the client's
width. The server holds one learnable embedding per client
(``strategy.embedding-dim``), aggregates them through a self-attention module
(:func:`fedsim.strategies.pa3dfl.maths.attention_aggregate`:
``E' = E + softmax(Q K^T / sqrt(d)) V``, learnable ``Wq, Wk, Wv``) and feeds
each aggregated embedding to a hypernetwork
(:class:`fedsim.learn.hypernet.HyperNetwork`, hidden width
``strategy.hidden-dim``) that outputs the full-width ``U`` and ``V`` of every
layer; a client receives their leading block at its width. After local
training (all of ``G``, ``U``, ``V`` and the biases, ``[train]`` settings) the
client returns ``G``, ``U``, ``V``; the server averages ``G`` and updates the
hypernetwork, the attention module and the embeddings as pFedHN does (Shamsian
et al., 2021): the gradient ``J^T (theta_sent - theta_returned)`` averaged over
the clients, one SGD step (``strategy.hyper-lr``, ``strategy.hyper-momentum``).
The biases (sized to the width) are private: they stay in the client's
``context.state`` across rounds. Evaluation is personalised (each client's
model on its local test split; no global model).

Choices where the paper's text (abstract and overview; its method section and
code were not available offline) leaves the decomposition open, and why:

- The factorisation ``U @ G @ V`` with a square general core: the only
  decomposition where the general part has one size for every width while the
  personal parts follow the width's rows and columns, so that averaging ``G``
  needs no padding or slicing.
- The personal factors of every width are leading blocks of one full-width
  output (HeteroFL's nesting), so one hypernetwork serves every capacity.
- The attention has a residual connection (transformer style), so that each
  client's aggregated embedding starts close to its own.
- ``G`` starts as ``pinv(U) W pinv(V)`` of the run's initial model and the
  mean generated factors (the closest core to the initial weights), so that the
  decomposed model does not start from a collapsed scale.
- The biases are private (not generated, not averaged): the paper generates
  personal parameters; here the weights' personal factors are generated and the
  small per-unit biases are kept by the client.

Message contract (keys from :mod:`fedsim.core.messages`):

- ``train`` down: ``arrays`` (``<layer>.G`` of every layer, and the node's
  ``<layer>.U`` / ``<layer>.V`` at its width), ``config`` (``server-round``).
- ``train`` up: ``arrays`` (the same keys and shapes after local training),
  ``metrics`` (``loss``, ``num-examples``, ``width``, ``params``,
  ``memory-mb``).
- ``evaluate`` down: ``arrays`` as for ``train``, ``config``.
- ``evaluate`` up: ``metrics`` (``loss``, ``accuracy``, ``num-examples``,
  ``width``; ``robust-loss``, ``robust-accuracy`` when ``robust.epsilon`` > 0).
"""

from dataclasses import dataclass

from fedsim.core.capacity import capacities_option
from fedsim.core.family import Family
from fedsim.core.schema import at_least, non_negative, option, positive


@dataclass(frozen=True)
class Options:
    """Pa3dFL's keys."""

    capacities: tuple[float, ...] = capacities_option()
    rank: int = option(
        16, "size of each layer's general core G (rank x rank)", at_least(1)
    )
    embedding_dim: int = option(16, "size of each client's embedding", at_least(1))
    hidden_dim: int = option(64, "hidden width of the hypernetwork", at_least(1))
    hyper_lr: float = option(
        0.01,
        "server SGD learning rate of hypernetwork, attention, embeddings",
        positive,
    )
    hyper_momentum: float = option(0.9, "server SGD momentum", non_negative)


FAMILY = Family(
    name="pa3dfl",
    summary="Pa3dFL (Wang et al., 2024): layers as U G V; general G averaged; "
    "personal U, V generated per capacity from attention-aggregated embeddings",
    server="fedsim.strategies.pa3dfl.server:build",
    client="fedsim.clients.pa3dfl:Pa3dFLClient",
    options=Options,
    global_model=False,
    server_state=True,
    check="fedsim.learn.capacity:check_sliceable",
)
