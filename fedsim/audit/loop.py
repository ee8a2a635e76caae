"""The dummy-input loop every attack shares, and what an attack returns.

Geiping et al.'s optimiser (their ``inversefed`` reconstruction script,
configuration ``inversed``): Adam on the *signed* gradient, learning rate
divided by 10 at 3/8, 5/8 and 7/8 of the iterations, image inputs kept in
[0, 1] after every step, the iterate with the lowest loss kept. The attacks
differ only in the objective they hand to :func:`descend` (gradient matching:
:mod:`fedsim.audit.inverting`; activation matching:
:mod:`fedsim.audit.activations`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedsim.core.experiment import AuditConfig


@dataclass(frozen=True)
class Reconstruction:
    """What an attack recovered from one client's upload.

    Attributes
    ----------
    images : numpy.ndarray
        ``(examples, *input_shape)``: one reconstruction per example attacked.
    labels : numpy.ndarray
        The labels the attack used or saw (granted, inferred, the optimised soft
        labels' argmax, or those that came with the activations); -1 where the
        server has none.
    loss : float
        The lowest matching loss reached.
    """

    images: np.ndarray
    labels: np.ndarray
    loss: float


def milestones(iterations: int) -> list[int]:
    """Iterations after which the learning rate is divided by 10."""
    return [int(iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]


def descend(
    x: torch.Tensor,
    others: Sequence[torch.Tensor],
    objective: Callable[[], tuple[torch.Tensor, Any]],
    settings: AuditConfig,
) -> tuple[float, torch.Tensor, Any]:
    """Minimise ``objective()`` over the dummy inputs ``x`` and ``others``.

    Parameters
    ----------
    x : Tensor
        The dummy inputs (``requires_grad``); clamped to [0, 1] after each step
        when they are images (4-D).
    others : sequence of Tensor
        Further optimised tensors (private unknowns, soft labels).
    objective : callable
        ``objective() -> (loss, aux)``: the loss at the current iterate, and
        what to keep (e.g. its labels) should this iterate be the best.
    settings : AuditConfig
        ``iterations`` and ``lr``.

    Returns
    -------
    (float, Tensor, Any)
        The lowest loss, the inputs that reached it (detached copy), and its aux.
    """
    optimised = [x, *others]
    optimizer = torch.optim.Adam(optimised, lr=settings.lr)
    schedule = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=milestones(settings.iterations), gamma=0.1
    )
    image = x.dim() == 4
    best, best_x, best_aux = float("inf"), x.detach().clone(), None
    for _ in range(settings.iterations):
        optimizer.zero_grad(set_to_none=True)
        loss, aux = objective()
        value = float(loss.detach())
        if value < best:
            best, best_x, best_aux = value, x.detach().clone(), aux
        loss.backward()
        for p in optimised:
            if p.grad is not None:
                p.grad.sign_()
        optimizer.step()
        schedule.step()
        if image:
            with torch.no_grad():
                x.clamp_(0.0, 1.0)
    return best, best_x, best_aux
