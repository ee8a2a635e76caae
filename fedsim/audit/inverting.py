"""Inverting Gradients: Geiping et al., "Inverting Gradients - How easy is it to
break privacy in federated learning?" (NeurIPS 2020).

The attacker starts from dummy inputs, replays the client's local training on
them (:func:`fedsim.audit.replay.simulate`: the known lr, epochs, batch size and
optimiser; for one local step this is the plain gradient) and moves the
inputs so that the replayed update points where the uploaded one does: loss
``1 - cos(replayed, uploaded) + tv * TV(x)``, Adam on the signed gradient,
learning rate divided by 10 at 3/8, 5/8 and 7/8 of the iterations, inputs kept
in [0, 1] (image data), the iterate with the lowest loss kept: the settings of
the reference code's reconstruction script (``inversefed``, its ``inversed``
configuration: signed Adam, lr 0.1, boxed, cosine over all layers with equal
weights, TV weight 1e-4, one restart). The budget is the reference's
(``audit.iterations`` 4,800: ``inversefed``'s ``DEFAULT_CONFIG`` and
``rec_mult.py``'s default; its ImageNet script runs 24,000), with its schedule
(milestones ``iterations // 2.667``, ``// 1.6``, ``// 1.142``; here
``int(iterations * 3/8)``, ``5/8``, ``7/8``: 1800, 3000, 4200 against its
1799, 3000, 4203). Deviations: dummy inputs start uniform in [0, 1] (there:
standard normal in normalised space).

Labels: ``known`` (the auditor grants the client's labels, the paper's
assumption), or ``inferred``: from the uploaded update of the output bias when
the upload carries it (:func:`fedsim.audit.maths.infer_label_counts`), else
optimised with the inputs as soft labels (DLG, Zhu et al. 2019).

The attack is a function of the sent content, the reply content and the public
hyper-parameters only (:func:`invert`); it never sees the client's data. A
surface that returns an :class:`~fedsim.audit.activations.ActivationScene`
(split learning's cut-layer activations) is attacked by
:func:`fedsim.audit.activations.invert_activations` instead, in the same loop
(:func:`fedsim.audit.loop.descend`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from flwr.app import RecordDict

from fedsim.audit.activations import ActivationScene, invert_activations
from fedsim.audit.loop import Reconstruction, descend
from fedsim.audit.maths import (
    cosine_distance,
    infer_label_counts,
    labels_from_counts,
    total_variation,
)
from fedsim.audit.replay import Public, Scene, simulate
from fedsim.core.experiment import AuditConfig

__all__ = ["Reconstruction", "Surface", "invert"]

#: ``surface(sent, reply, public) -> Scene`` (a family's ``Family.audit``); a
#: split family's surface returns an :class:`ActivationScene`.
Surface = Callable[[RecordDict, RecordDict, Public], Scene | ActivationScene]


def invert(
    sent: RecordDict,
    reply: RecordDict,
    public: Public,
    *,
    surface: Surface,
    settings: AuditConfig,
    generator: torch.Generator,
    labels: np.ndarray | None = None,
) -> Reconstruction:
    """Reconstruct a client's training inputs from what the server saw.

    Parameters
    ----------
    sent, reply : RecordDict
        The content the server sent the client and the content of its reply.
    public : Public
        The public hyper-parameters (experiment, data shape, round).
    surface : callable
        The family's view of the exchange (:mod:`fedsim.audit.replay`,
        :mod:`fedsim.audit.activations`).
    settings : AuditConfig
        Iterations, learning rate, TV weight.
    generator : torch.Generator
        The attack's own randomness (dummy inputs, soft labels); the global
        RNG streams are not drawn from.
    labels : numpy.ndarray, optional
        Granted labels (``audit.labels = "known"``); None infers them. Unused
        by activation inversion (the head's output does not depend on them).
    """
    scene = surface(sent, reply, public)
    if isinstance(scene, ActivationScene):
        return invert_activations(scene, public, settings=settings, generator=generator)
    n = scene.examples
    shape = public.info.input_shape
    x = torch.rand((n, *shape), generator=generator).requires_grad_(True)
    unknowns = {k: v.clone().requires_grad_(True) for k, v in scene.unknowns.items()}
    soft: torch.Tensor | None = None
    if labels is not None:
        y_fixed = torch.as_tensor(np.asarray(labels, np.int64))
    elif scene.bias is not None:
        y_fixed = torch.as_tensor(labels_from_counts(infer_label_counts(scene.bias, n)))
    else:
        y_fixed = None
        classes = public.info.num_classes
        soft = torch.randn((n, classes), generator=generator).requires_grad_(True)

    def objective() -> tuple[torch.Tensor, torch.Tensor]:
        y = y_fixed if soft is None else soft.softmax(dim=1)
        assert y is not None
        update = simulate(scene, x, y, unknowns)
        loss = cosine_distance(update, scene.observed) + settings.tv * (
            total_variation(x)
        )
        seen = y_fixed if soft is None else soft.detach().argmax(dim=1)
        assert seen is not None
        return loss, seen

    others = [*unknowns.values(), *([soft] if soft is not None else [])]
    best, best_x, best_y = descend(x, others, objective, settings)
    return Reconstruction(best_x.numpy(), np.asarray(best_y), best)
