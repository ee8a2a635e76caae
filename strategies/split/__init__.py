"""Split learning: SplitFed V1 and V2 (Thapa et al., "SplitFed: When Federated
Learning Meets Split Learning", AAAI 2022) and U-shaped split learning
(Vepakomma et al., "Split learning for health", 2018).

The model is cut (:mod:`fedsim.learn.split`; ``split.cut`` names the last stage
the client runs, empty for the model's default; a Hugging Face model is cut at
a block named by its module path, :mod:`fedsim.learn.hf_split`, and its padding
mask travels beside the hidden states as ``context.mask``). The client runs the first
segment, the server the rest; activations go up, gradients of the cut
activations come down, every tensor in the messages (so the recorded bytes are
what crosses the cut). ``split.quantization`` picks the codec of both
(:data:`fedsim.learn.codecs.CODECS`: ``none``, ``int8``, ``int4``, ``amaq``:
learned per-channel bit widths, :mod:`fedsim.learn.amaq`, whose gate the client
learns and keeps in its ``context.state`` across rounds; the clients' last
replies then carry ``mean-bits``, the mean bit width of the activations they
sent that round; ``anneal``: one bit width for every channel, falling uniformly
from ``split.anneal-start-bits`` to ``split.anneal-end-bits`` over the rounds,
:mod:`fedsim.learn.anneal`, AMAQ's comparator at its budget). ``sfprompt``
(:mod:`fedsim.strategies.split.sfprompt`) builds on U-shaped split learning.

- ``sfl-v1``: the sampled clients run concurrently; the server keeps one copy of
  the server segment per client (each starts the round from the global one and
  takes an SGD step per batch of its client). End of round: example-weighted
  FedAvg of the client segments, and of the server copies with the same weights.
- ``sfl-v2``: one server segment; after every client's first forward (all at
  once) the server serves the clients one after another, in a seeded random
  order, so its weights change after every batch of every client; client
  segments are FedAvg'd at the end of the round.
- ``split-ushape``: the client holds the head (stages up to ``split.cut``) and
  the tail (from ``split.tail``, default the ``head`` layer) with the loss; the
  server holds the body, one copy per client as in V1. Labels and raw inputs
  never leave the client: per batch, activations up, body output down, the
  gradient of the body output up, the gradient of the head output down.

Per batch (one round trip; two for U-shaped): the client cannot keep an autograd
graph between messages (another process may serve the next one), so the reply
that applies batch t's gradient recomputes batch t's forward (dropout masks
from a seed of the run, round, partition and batch), steps, and carries batch
t+1's activations. The client's segment weights, optimiser state and cursor
live in its ``context.state`` between messages (:data:`fedsim.clients.split.STATE`);
batches come from :func:`fedsim.learn.split.batch_plan` (``train.epochs``
passes, ``train.batch-size``, seeded by run, round and partition). Both sides
use ``train.optimizer``, ``lr``, ``momentum`` and ``weight-decay``, fresh each
round. The global model (client and server segments together) is evaluated by
the server on the held-out test set after each round; there is no federated
evaluation (``federation.fraction-evaluate`` is unused).

Message contract (keys from :mod:`fedsim.core.messages`; ``cut`` holds arrays
named ``<prefix>.<codec array>``, see :func:`fedsim.learn.codecs.encode`):

- ``train`` down: ``arrays`` (the global client segment(s), the model's state-dict
  names), ``config`` (``server-round``).
- ``train`` up, and ``train.split_step`` up while batches remain: ``cut``
  (``activations.*`` of the next batch, ``context.*`` with an HF model;
  SplitFed also ``labels``), ``metrics`` (``batches``).
- ``train.split_step`` down: ``cut`` (``gradient.*`` of the cut activations of
  the client's last batch), ``config``.
- ``train.split_tail`` down (U-shaped): ``cut`` (``activations.*``: the body's
  output, and its ``context.*``); up: ``cut`` (``gradient.*`` of the body's output).
- ``train.split_step`` up after the last batch: ``arrays`` (the client
  segment(s) after the round), ``metrics`` (``num-examples``, ``batches``;
  U-shaped also ``loss``).

Client/server segment API (for families built on this one, e.g. SFPrompt):

- cutting: :func:`fedsim.learn.split.stages` names a packaged model's stages,
  :func:`~fedsim.learn.split.cut_points` turns ``split.cut`` (and ``split.tail``)
  into cut indices, :func:`~fedsim.learn.split.split_model` returns
  :class:`~fedsim.learn.split.Segment` s sharing the model's modules (callable;
  ``parameters()``, ``state()`` and ``load()`` under the model's state-dict
  names).
- codecs: :data:`fedsim.learn.codecs.CODECS` (name -> ``factory(options)``; add
  one by registering it there), :func:`~fedsim.learn.codecs.encode` /
  :func:`~fedsim.learn.codecs.decode` name the arrays ``<prefix>.<array>``. The
  codecs live in ``fedsim/learn`` because both sides use them and
  ``clients/`` may not import ``strategies/``.
- server: :class:`fedsim.strategies.split.server.SplitStrategy` runs a round as one
  :class:`~fedsim.strategies.split.server.Session` per client (``respond(reply) ->
  (action, content) | None``); override ``sessions`` (who shares which server
  segment), ``serve`` (together or one after another), ``client_segments`` /
  ``server_segment`` (who holds which segment) and ``server_state``
  (aggregation of the server side). :class:`~fedsim.strategies.split.server.
  ServerSegment` is the server's segment with its optimiser: ``step`` for a
  segment ending in the loss, ``forward`` / ``backward`` for a body.
- client: :class:`fedsim.clients.split.SplitClient` (``own`` segments, ``plan`` of
  batches, ``head_output``, ``upload``, ``final``; ``restore`` / ``save`` of
  ``context.state``) and :class:`fedsim.clients.split.UshapeClient` (``split_tail``).

U-shaped training keeps one body copy per client, as V1 (the clients run
concurrently).

LoRA (``peft.method = "lora"``, the family's ``model`` hook
:func:`fedsim.learn.hf_split.prepare`, applied by the client to its own build
too): adapters injected in place on every side, the base frozen; segments then
carry only their trainable arrays (the adapters), so ``train`` sends and the
replies return adapters, averaged as any segment weight and kept across rounds
(the round's global arrays keep the frozen base). One rank for every client.
The loss is the task's (:meth:`fedsim.learn.tasks.Task.logits_loss`); what
SplitFed sends as ``labels`` is :meth:`~fedsim.learn.tasks.Task.targets` (a
causal LM's tokens).
"""

from dataclasses import dataclass

from fedsim.core.family import Family
from fedsim.core.messages import SPLIT_STEP, SPLIT_TAIL
from fedsim.core.schema import at_least, fraction, option, positive
from fedsim.learn.codecs import bit_width, codec_name

_NO_DP = (
    "split learning shares activations and gradients per batch, which neither "
    "DP-SGD's per-example clipping of the client segment nor client-level "
    "DP-FedAvg covers; that pairing is not implemented"
)


@dataclass(frozen=True)
class Options:
    """``[split]``: where the model is cut and how the cut tensors are coded."""

    cut: str = option(
        "",
        "last stage the client runs (name or index, see fedsim.learn.split; an "
        "hf model's block by its module path, e.g. model.layers.1); empty: mlp "
        "body.2, cnn features.4, vit blocks.0, hf the first block",
    )
    quantization: str = option(
        "none",
        "codec of activations up and gradients down: none, int8, int4 "
        "(per-channel scale and zero point), amaq (learned per-channel bits), "
        "anneal (one bit width, annealed over the rounds)",
        codec_name,
    )
    min_bits: int = option(2, "fewest bits per value of an adaptive codec", at_least(1))
    max_bits: int = option(8, "most bits per value of an adaptive codec", at_least(1))
    amaq_start_bits: float = option(
        8.0, "AMAQ: mean bit width the budget starts from", at_least(1)
    )
    amaq_end_bits: float = option(
        4.0, "AMAQ: mean bit width the budget anneals to by the last round", at_least(1)
    )
    amaq_weight: float = option(10.0, "AMAQ: weight of the bit penalty", positive)
    amaq_lr: float = option(0.2, "AMAQ: Adam learning rate of the gate", positive)
    anneal_start_bits: int = option(
        8, "anneal: bit width of every channel in the first round", bit_width
    )
    anneal_end_bits: int = option(
        4,
        "anneal: bit width in the last round (uniform steps between; equal to "
        "anneal-start-bits for fixed precision)",
        bit_width,
    )


@dataclass(frozen=True)
class UshapeOptions(Options):
    """U-shaped: the client also holds the tail."""

    tail: str = option(
        "head", "first stage of the client's tail (name or index); the body between"
    )


_REJECTS = {"dp-sgd": _NO_DP, "dp-fedavg": _NO_DP}
_ACTIONS = (SPLIT_STEP, SPLIT_TAIL)


#: What the server sees of a client's round: its first batch's cut activations,
#: against the head it sent (:mod:`fedsim.audit.activations`).
_AUDIT = "fedsim.audit.activations:cut_activations"


def _family(
    name: str,
    summary: str,
    server: str,
    client: str = "fedsim.clients.split:SplitClient",
    options: type[Options] = Options,
) -> Family:
    """A split family: keys in ``[split]``, no DP, the split actions and the
    one :func:`fedsim.strategies.split.server.check`; ``server`` names its builder in
    :mod:`fedsim.strategies.split.server`."""
    return Family(
        name=name,
        summary=summary,
        server=f"fedsim.strategies.split.server:{server}",
        client=client,
        options=options,
        section="split",
        rejects=_REJECTS,
        check="fedsim.strategies.split.server:check",
        actions=_ACTIONS,
        audit=_AUDIT,
        peft=("none", "lora"),
        model="fedsim.learn.hf_split:prepare",
    )


V1 = _family(
    "sfl-v1",
    "SplitFed V1 (Thapa et al., 2022): clients in parallel, a server segment copy "
    "per client, FedAvg of both sides",
    "build_v1",
)
V2 = _family(
    "sfl-v2",
    "SplitFed V2 (Thapa et al., 2022): one server segment serving the clients one "
    "after another; FedAvg of the client segments",
    "build_v2",
)
USHAPE = _family(
    "split-ushape",
    "U-shaped split learning: the client holds head and tail with the labels, the "
    "server the body",
    "build_ushape",
    client="fedsim.clients.split:UshapeClient",
    options=UshapeOptions,
)

#: The three families (the entry points ``sfl-v1``, ``sfl-v2`` and
#: ``split-ushape`` load this).
FAMILIES = (V1, V2, USHAPE)


@dataclass(frozen=True)
class SFPromptOptions(UshapeOptions):
    """SFPrompt: prompts, pruning and the local-loss update."""

    tail: str = option(
        "pool",
        "first stage of the client's tail (name or index; at most 'pool', so that "
        "tail(head(x)) is defined)",
    )
    prompts: int = option(
        4, "soft prompt tokens inserted after the class token", at_least(1)
    )
    keep_fraction: float = option(
        0.5,
        "fraction of local examples kept each round (the largest EL2N scores)",
        fraction,
    )
    local_epochs: int = option(
        1, "epochs of the local-loss update (tail(head(x)), no messages)", at_least(0)
    )


#: SFPrompt (Cao et al., 2024); the entry point ``sfprompt`` loads it.
SFPROMPT = Family(
    name="sfprompt",
    summary="SFPrompt (Cao et al., 2024): frozen pre-trained ViT, client prompts "
    "and tail, EL2N pruning, local-loss update, U-shaped split training",
    server="fedsim.strategies.split.sfprompt:build",
    client="fedsim.clients.sfprompt:SFPromptClient",
    options=SFPromptOptions,
    section="split",
    rejects=_REJECTS,
    check="fedsim.strategies.split.sfprompt:check",
    actions=_ACTIONS,
    model="fedsim.strategies.split.sfprompt:prompted",
    audit="fedsim.audit.activations:prompted_head",
)
