"""Activation inversion for split learning: what the server reconstructs from
the cut-layer activations ("smashed data") a client uploads.

In SplitFed (``sfl-v1``, ``sfl-v2``), U-shaped split learning
(``split-ushape``) and SFPrompt (``sfprompt``) the client runs the first segment
of the model (the *head*) and sends its output for each batch to the server.
The server also holds the head's weights: it aggregated them at the end of the
last round and sent them down in this round's ``train`` message. The attacker
is the server: it takes the head exactly as it sent it (never the client's live
weights), starts from dummy inputs, one per activation row, and moves them so
that ``head(x)`` lands on the activations it received (white-box model
inversion, He et al., "Model inversion attacks against collaborative
inference", ACSAC 2019, its rMLE attack): loss ``||head(x) - a||^2 / ||a||^2 +
tv * TV(x)``, in the loop every attack shares (:func:`fedsim.audit.loop.descend`:
signed Adam, lr /10 at 3/8, 5/8, 7/8, images boxed in [0, 1], best iterate
kept). The same scoring follows (best PSNR against the seeded partition).

Which exchange: by default (``audit.batches = [0]``) the client's first upload
of the round, the reply to the ``train`` message (batch 0 of its plan). It is
the one upload computed by the head the server holds: every later batch's
activations come after the client stepped its head on earlier batches whose
inputs the server does not know. ``audit.batches`` may name later batches
(batch ``t`` answers the server's ``t``-th gradient); they are inverted
against the same sent head, stale by ``t`` client steps (a deviation the
attacker cannot avoid without the earlier inputs). The auditor keeps them
(:meth:`fedsim.audit.auditor.Auditor.observe`): replies carrying ``cut``
activations after the round's ``train`` message, which carried ``arrays``.

What the server sees, as it sees it: the activations *decoded* by the run's
codec (``split.quantization``: ``none``, ``int8``, ``int4``, ``amaq``), the
values the server computes on. The head runs in eval mode: dropout masks
(none in the packaged models' default heads) are the client's to draw.

Reachable per family:

- ``sfl-v1``, ``sfl-v2``: the head's output, and the labels, which travel with
  the activations (the server computes the loss); the reconstruction carries
  them.
- ``split-ushape``: the head's output; the labels and the tail stay on the
  client (the server sends the body's output down and never sees a loss), so
  the attack reconstructs inputs without labels (it needs none).
- ``sfprompt``: the head is the frozen pre-trained embedding and first blocks
  (public: every process builds the same pre-trained base) plus the prompts the
  server aggregated. Before batch 0 the client has already updated its prompts
  by ``split.local-epochs`` of local loss, so the sent prompts are stale; the
  attacker optimises the prompts with the inputs, starting from the sent ones
  (:func:`prompted_head`), as HyperFL's attacker does with the private head.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import RecordDict
from torch import nn
from torch.func import functional_call

from fedsim.audit.loop import Reconstruction, descend
from fedsim.audit.maths import relative_distance, total_variation
from fedsim.audit.replay import Public, Tensors
from fedsim.core import registry
from fedsim.core.experiment import AuditConfig
from fedsim.core.messages import ACTIVATIONS, ARRAYS, CUT, LABELS
from fedsim.learn.base import build_model
from fedsim.learn.codecs import CODECS, decode
from fedsim.learn.split import cut_points, from_record, split_model

#: Name (in ``unknowns``) of SFPrompt's prompt tokens, the model's own.
PROMPTS = "prompts"


@dataclass
class ActivationScene:
    """One client's activation upload as the attacker sees it.

    Attributes
    ----------
    forward : callable
        ``forward(unknowns, x) -> activations``: the head the server holds.
    observed : Tensor
        The activations the server received, decoded, ``(rows, ...)``: one
        dummy input per row.
    labels : numpy.ndarray or None
        The labels that came with them (SplitFed), None when the server gets
        none (U-shaped, SFPrompt).
    unknowns : dict of str to Tensor
        First guesses of head tensors the client may have changed before the
        upload (SFPrompt's prompts), optimised with the inputs.
    """

    forward: Callable[[Tensors, torch.Tensor], torch.Tensor]
    observed: torch.Tensor
    labels: np.ndarray | None = None
    unknowns: Tensors = field(default_factory=dict)


class _Head(nn.Module):
    """The head segment as a module (so ``functional_call`` can swap tensors
    of the model it runs)."""

    def __init__(self, model: nn.Module, cut: str, tail: str | None):
        super().__init__()
        self.model = model
        self.segment = split_model(model, cut_points(model, cut, tail))[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.segment(x)  # type: ignore[no-any-return]


def held_head(sent: RecordDict, public: Public) -> _Head:
    """The head as the server holds it: the model every process builds (the
    family's adaptation included), overwritten by the weights the server sent
    in ``train``, cut at ``split.cut``; frozen, eval mode."""
    exp = public.experiment
    model = build_model(exp.model, public.info, exp.seed)
    model = registry.family(exp.strategy.name).adapt_model(model, exp)
    arrays = sent.array_records[ARRAYS].to_torch_state_dict()
    model.load_state_dict(arrays, strict=False)
    model.requires_grad_(False)
    options = exp.strategy.options
    return _Head(model, options.cut, getattr(options, "tail", None)).eval()


def received(
    reply: RecordDict, public: Public
) -> tuple[torch.Tensor, np.ndarray | None]:
    """The activations of ``reply`` as the server decodes them, and the labels
    that came with them (None if none); no rows when the reply carries none (a
    client without training examples answers ``train`` with its segment)."""
    if CUT not in reply:
        return torch.empty(0), None
    options = public.experiment.strategy.options
    codec = CODECS[options.quantization](options)
    cut = from_record(reply.array_records[CUT])
    values = torch.from_numpy(np.array(decode(codec, ACTIVATIONS, cut), np.float32))
    labels = cut.get(LABELS)
    return values, None if labels is None else np.asarray(labels)


def cut_activations(
    sent: RecordDict, reply: RecordDict, public: Public
) -> ActivationScene:
    """SplitFed V1/V2 and U-shaped: the head's output on the client's batch 0,
    against the head the server sent in ``train``."""
    head = held_head(sent, public)
    observed, labels = received(reply, public)
    return ActivationScene(lambda unknowns, x: head(x), observed, labels)


def prompted_head(
    sent: RecordDict, reply: RecordDict, public: Public
) -> ActivationScene:
    """SFPrompt: as :func:`cut_activations`, the prompts optimised from the sent
    ones when the client updated them locally before the upload
    (``split.local-epochs`` > 0)."""
    head = held_head(sent, public)
    observed, labels = received(reply, public)
    if public.experiment.strategy.options.local_epochs == 0:
        return ActivationScene(lambda unknowns, x: head(x), observed, labels)
    start = {PROMPTS: head.model.get_parameter(PROMPTS).detach().clone()}

    def forward(unknowns: Tensors, x: torch.Tensor) -> torch.Tensor:
        swapped = {f"model.{PROMPTS}": unknowns[PROMPTS]}
        return functional_call(head, swapped, (x,))  # type: ignore[no-any-return]

    return ActivationScene(forward, observed, labels, start)


def invert_activations(
    scene: ActivationScene,
    public: Public,
    *,
    settings: AuditConfig,
    generator: torch.Generator,
) -> Reconstruction:
    """Dummy inputs, one per activation row, moved until the held head maps
    them onto the received activations (``audit.iterations``, ``lr``, ``tv``).

    Parameters
    ----------
    scene : ActivationScene
        What the server received and the head it holds.
    public : Public
        The data's input shape.
    settings : AuditConfig
        Iterations, learning rate, TV weight.
    generator : torch.Generator
        The attack's own randomness (the dummy inputs).
    """
    n = len(scene.observed)
    shape = public.info.input_shape
    if n == 0:
        return Reconstruction(np.empty((0, *shape), np.float32), np.empty(0), 0.0)
    x = torch.rand((n, *shape), generator=generator).requires_grad_(True)
    unknowns = {k: v.clone().requires_grad_(True) for k, v in scene.unknowns.items()}

    def objective() -> tuple[torch.Tensor, None]:
        out = scene.forward(unknowns, x)
        match = relative_distance(out, scene.observed)
        return match + settings.tv * total_variation(x), None

    best, best_x, _ = descend(x, list(unknowns.values()), objective, settings)
    labels = scene.labels if scene.labels is not None else np.full(n, -1, np.int64)
    return Reconstruction(best_x.numpy(), labels, best)


#: The attacks each surface feeds (``audit.attack`` must name them).
cut_activations.attacks = prompted_head.attacks = ("inverting-activations",)  # type: ignore[attr-defined]
