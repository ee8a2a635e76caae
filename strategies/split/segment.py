"""The server's segment in a split-learning session, with its optimiser: a
segment ending in the loss (SplitFed) or a body (U-shaped); see
:mod:`fedsim.strategies.split`."""

from __future__ import annotations

import numpy as np
import torch

from fedsim.core.experiment import TrainConfig
from fedsim.learn.split import Segment, context_arrays, cut_tensor, received
from fedsim.learn.tasks import Classification, Task
from fedsim.learn.training import make_optimizer


class ServerSegment:
    """The server's segment in one session, with its own optimiser.

    Parameters
    ----------
    segment : Segment
        The stages the server runs.
    train : TrainConfig
        ``optimizer``, ``lr``, ``momentum``, ``weight-decay``.
    device : torch.device
        Where the segment lives.
    task : Task
        The loss of a segment that ends in the logits (default: cross-entropy
        of class logits).
    """

    def __init__(
        self,
        segment: Segment,
        train: TrainConfig,
        device: torch.device,
        task: Task | None = None,
    ):
        self.segment = segment
        self.device = device
        self.task = task if task is not None else Classification()
        # A frozen segment (SFPrompt's body) passes gradients, steps nothing.
        trains = any(p.requires_grad for p in segment.parameters())
        self.optimizer = make_optimizer(segment.parameters(), train) if trains else None
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def _input(self, values: np.ndarray) -> torch.Tensor:
        self.segment.model.train()
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        return torch.from_numpy(values).to(self.device).requires_grad_(True)

    def step(
        self,
        activations: np.ndarray,
        labels: np.ndarray,
        cut: dict[str, np.ndarray] | None = None,
    ) -> tuple[np.ndarray, float]:
        """A segment ending in the loss: forward, the task's loss, backward,
        step. ``cut``: the message's arrays (their ``context.*`` go with the
        activations). Returns the loss's gradient with respect to
        ``activations``, and the loss."""
        a = self._input(activations)
        y = torch.from_numpy(labels).to(self.device)
        loss = self.task.logits_loss(self.segment(received(cut or {}, a)), y)
        loss.backward()
        self.optimizer.step()
        assert a.grad is not None
        return a.grad.cpu().numpy(), float(loss.detach())

    def forward(
        self, activations: np.ndarray, cut: dict[str, np.ndarray] | None = None
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """A body: its output, and the ``context.*`` arrays that go with it
        (the graph is kept for :meth:`backward`)."""
        a = self._input(activations)
        out = self.segment(received(cut or {}, a))
        tensor = cut_tensor(out)
        self._pending = (a, tensor)
        return tensor.detach().cpu().numpy(), context_arrays(out)

    def backward(self, gradient: np.ndarray) -> np.ndarray:
        """Backward from the gradient of the body's output, step; the gradient
        with respect to the body's input."""
        if self._pending is None:
            raise RuntimeError("backward before forward")
        a, out = self._pending
        self._pending = None
        out.backward(torch.from_numpy(gradient).to(self.device))
        if self.optimizer is not None:
            self.optimizer.step()
        assert a.grad is not None
        return a.grad.cpu().numpy()
