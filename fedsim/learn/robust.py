"""PGD adversarial examples and robust evaluation (Madry et al., ICLR 2018).

L-infinity projected gradient descent on the cross-entropy (or, with
:func:`feature_pgd`, on a feature distance): a uniform random
start in the epsilon-ball, ``steps`` signed-gradient ascent steps of
``step_size``, each followed by the projection back into the ball (and into
the data's bounds, [0, 1] for images with ``robust.clip``). Gradients are
taken with respect to the input only (``torch.autograd.grad``), so the
model's parameter gradients are untouched.
Any family reports robust accuracy by adding :func:`robust_metrics` to its
evaluate reply; ``robust.epsilon = 0`` (the default) turns it off.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fedsim.core.experiment import RobustConfig
from fedsim.learn.data import Arrays
from fedsim.learn.training import EvalStats

#: ``forward(x) -> logits`` of the model under attack.
Forward = Callable[[torch.Tensor], torch.Tensor]


def step_size_of(cfg: RobustConfig) -> float:
    """The configured step size, or Madry et al.'s ``2.5 * epsilon / steps``."""
    return cfg.step_size or 2.5 * cfg.epsilon / cfg.steps


def ascend(
    objective: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    epsilon: float,
    steps: int,
    step_size: float,
    bounds: tuple[float, float] | None = (0.0, 1.0),
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """L-infinity projected signed-gradient ascent of ``objective`` from ``x``.

    Parameters
    ----------
    objective : callable
        ``x_adv -> scalar`` to maximise.
    x : torch.Tensor
        The clean inputs (the centre of the ball).
    epsilon, steps, step_size, bounds, random_start, generator
        As for :func:`pgd`.

    Returns
    -------
    torch.Tensor
        Detached examples, ``|x_adv - x|_inf <= epsilon``.
    """
    x = x.detach()
    if epsilon <= 0:
        return x.clone()
    adv = x.clone()
    if random_start:
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        adv = adv + (2 * noise - 1) * epsilon
    low, high = x - epsilon, x + epsilon
    if bounds is not None:
        low, high = low.clamp(*bounds), high.clamp(*bounds)
    adv = torch.max(torch.min(adv, high), low)
    for _ in range(steps):
        adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(objective(adv), adv)
        adv = adv.detach() + step_size * grad.sign()
        adv = torch.max(torch.min(adv, high), low)
    return adv.detach()


def pgd(
    forward: Forward,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epsilon: float,
    steps: int,
    step_size: float,
    bounds: tuple[float, float] | None = (0.0, 1.0),
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """L-infinity PGD examples for ``(x, y)``: :func:`ascend` on the
    cross-entropy of ``forward``.

    Parameters
    ----------
    forward : callable
        ``x -> logits`` (a model, or a model up to an auxiliary head).
    x, y : torch.Tensor
        Inputs and labels.
    epsilon : float
        Radius of the L-infinity ball around ``x``.
    steps : int
        Ascent steps.
    step_size : float
        Size of each signed-gradient step.
    bounds : (float, float), optional
        Also keep the examples in ``[low, high]`` (``(0, 1)``: images; a
        feature space after a ReLU: ``(0, inf)``; None: unbounded).
    random_start : bool
        Start from a uniform draw in the ball (else from ``x``).
    generator : torch.Generator, optional
        Source of the random start (on ``x``'s device).

    Returns
    -------
    torch.Tensor
        Detached adversarial examples, ``|x_adv - x|_inf <= epsilon``.
    """
    return ascend(
        lambda adv: F.cross_entropy(forward(adv), y),
        x,
        epsilon=epsilon,
        steps=steps,
        step_size=step_size,
        bounds=bounds,
        random_start=random_start,
        generator=generator,
    )


def feature_pgd(
    forward: Forward,
    x: torch.Tensor,
    *,
    epsilon: float,
    steps: int,
    step_size: float,
    bounds: tuple[float, float] | None = (0.0, 1.0),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """PGD examples that move ``forward``'s output as far as they can: the
    maximiser of ``sum_b ||m(x'_b) - m(x_b)||^2 / B`` (FedProphet's
    reference, ``moduleclient.py``: ``feature_adv_loss``), random start.
    """
    with torch.no_grad():
        clean = forward(x.detach()).detach()
    return ascend(
        lambda adv: (forward(adv) - clean).square().sum() / len(adv),
        x,
        epsilon=epsilon,
        steps=steps,
        step_size=step_size,
        bounds=bounds,
        generator=generator,
    )


def robust_evaluate(
    model: nn.Module,
    arrays: Arrays,
    cfg: RobustConfig,
    *,
    device: torch.device,
    seed: int = 0,
    batch_size: int = 512,
) -> EvalStats:
    """Cross-entropy loss and accuracy of ``model`` on PGD examples of
    ``arrays`` (the model in eval mode)."""
    model.eval()
    if len(arrays) == 0:
        return EvalStats(float("nan"), float("nan"), 0)
    generator = torch.Generator(device=device).manual_seed(seed)
    loss, correct = 0.0, 0
    for start in range(0, len(arrays), batch_size):
        x = torch.from_numpy(arrays.x[start : start + batch_size]).to(device)
        y = torch.from_numpy(arrays.y[start : start + batch_size]).to(device)
        adv = pgd(
            model,
            x,
            y,
            epsilon=cfg.epsilon,
            steps=cfg.steps,
            step_size=step_size_of(cfg),
            bounds=(0.0, 1.0) if cfg.clip else None,
            generator=generator,
        )
        with torch.no_grad():
            logits = model(adv)
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(dim=1) == y).sum())
    n = len(arrays)
    return EvalStats(loss / n, correct / n, n)


def robust_metrics(
    model: nn.Module,
    arrays: Arrays,
    cfg: RobustConfig,
    *,
    device: torch.device,
    seed: int = 0,
) -> dict[str, float]:
    """``robust-loss`` and ``robust-accuracy`` of ``model`` on ``arrays``; empty
    when ``robust.epsilon`` is 0."""
    if cfg.epsilon <= 0:
        return {}
    stats = robust_evaluate(model, arrays, cfg, device=device, seed=seed)
    return {"robust-loss": stats.loss, "robust-accuracy": stats.accuracy}
