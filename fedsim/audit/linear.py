"""Where an upload exposes the gradient of a linear layer with bias: the facts
the analytic attacks (:mod:`fedsim.audit.analytic`) need from a surface.

A surface (:mod:`fedsim.audit.replay`) says, for each linear layer of the
client's model whose weight and bias gradients can be read off the upload,
which uploaded tensors carry them (:class:`LinearTensors`), and which linear
layer, if any, takes the model's raw input (:func:`input_linear`): only there
is the ratio of the gradients an input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LinearTensors:
    """The uploaded tensors whose update carries a linear layer's gradients.

    Attributes
    ----------
    weight, bias : str
        Keys of the scene's ``observed`` update.
    shape : torch.Size
        The layer's weight shape ``(out, in)``.
    outer : bool
        False: the update of ``weight`` (``bias``) *is* the update of the
        layer's weight (bias), flattened or not (FedAvg; HyperFL's output-head
        biases, whose gradient is the generated tensor's gradient). True: the
        keys are the weights of linear output heads that generate the layer's
        weight and bias from one shared feature vector ``h``, so each step's
        gradient is the outer product ``dL/dW_flat h^T`` and every column ``k``
        is ``h_k`` times the layer's gradient (HyperFL's heads without bias).
    """

    weight: str
    bias: str
    shape: torch.Size
    outer: bool = False


def linear_layers(model: nn.Module) -> dict[str, torch.Size]:
    """Name -> weight shape of every ``nn.Linear`` of ``model`` with a bias."""
    return {
        name: module.weight.shape
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module.bias is not None
    }


def input_linear(model: nn.Module, input_shape: tuple[int, ...]) -> str | None:
    """The ``nn.Linear`` (with bias) of ``model`` whose input is the model's raw
    input, flattened (an MLP's first layer), or None (a convolution or patch
    embedding comes first).

    Found by running the model once on random inputs and comparing what each
    linear layer receives with them; the model's mode and the global RNG are
    left as they were.
    """
    candidates = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module.bias is not None
    }
    x = torch.rand((2, *input_shape), generator=torch.Generator().manual_seed(0))
    flat = x.reshape(2, -1)
    found: list[str] = []

    def hook(name: str):  # type: ignore[no-untyped-def]
        def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            inp = args[0]
            if inp.shape == flat.shape and torch.equal(inp, flat):
                found.append(name)

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in candidates.items()]
    training = model.training
    try:
        model.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            model(x)
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    return found[0] if found else None
