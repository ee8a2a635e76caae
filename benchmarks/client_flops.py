"""Client-side training FLOPs of SFPrompt, U-shaped split fine-tuning and
federated full fine-tuning of one ViT, counted by PyTorch's
``torch.utils.flop_counter.FlopCounterMode`` on the real segments (matrix
products and attention; forward and the backward that autograd actually runs,
so a frozen weight costs no weight gradient).

Per client with ``n`` training examples, ``E = train.epochs``, ``L =
split.local-epochs`` and ``k = ceil(split.keep-fraction * n)`` kept:

- full fine-tuning (FedAvg): ``E * n * C(model)``, every weight trained;
- U-shaped: ``E * n * (F(head) + C(head) + C(tail))``: the head's forward for
  the upload, its recomputed forward + backward when the gradient comes down
  (:mod:`fedsim.clients.split`), the tail's forward + backward;
- SFPrompt: ``n * F(tail o head)`` (EL2N scores) ``+ L * k * C(tail o head)``
  (local-loss update) ``+ E * k * (F(head) + C(head) + C(tail))`` (the split
  phase), only prompts and tail trained;

``F`` a forward without autograd, ``C`` forward + backward. The federated
evaluation's forward passes are not counted (training only, as the paper's
local FLOPs). Counted per example on a batch of the client's own data.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from fedsim.learn.data import federated_data
from fedsim.learn.models import build_architecture
from fedsim.learn.prompts import add_prompts, keep_count
from fedsim.learn.split import cut_points, split_model

BATCH = 16


def counted(step: Callable[[], Any]) -> float:
    """FLOPs that ``step`` runs."""
    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def _trainable(model: torch.nn.Module, names: set[str] | None) -> None:
    """Only ``names`` need gradients (all with ``None``)."""
    for name, param in model.named_parameters():
        param.requires_grad_(names is None or name in names)


def per_example(exp: Any, *, cut: str, tail: str, prompts: int) -> dict[str, float]:
    """FLOPs per example: ``full`` (C(model)), ``ushape`` (F(head) + C(head) +
    C(tail)), and SFPrompt's ``score``, ``local`` and ``split`` pieces."""
    data = federated_data(exp.data, exp.federation.clients, exp.seed)
    train = data.client(0).train
    x = torch.from_numpy(train.x[:BATCH])
    y = torch.from_numpy(train.y[:BATCH])
    b = len(y)

    def split_costs(model: torch.nn.Module) -> tuple[Any, Any, float]:
        segments = split_model(model, cut_points(model, cut, tail))
        head, last = segments[0], segments[-1]

        def head_step() -> None:
            out = head(x)
            out.backward(torch.ones_like(out))

        def tail_step() -> None:
            with torch.no_grad():
                h = head(x)
            h.requires_grad_(True)
            loss = F.cross_entropy(last(h), y)
            loss.backward()

        with torch.no_grad():
            forward = counted(lambda: head(x))
        tail_cost = counted(tail_step) - counted(lambda: head(x))
        return head, last, forward + counted(head_step) + tail_cost

    model = build_architecture(exp.model, data.info, exp.seed)
    _trainable(model, None)
    full = counted(lambda: F.cross_entropy(model(x), y).backward())
    _, _, ushape = split_costs(model)

    prompted = build_architecture(exp.model, data.info, exp.seed)
    add_prompts(prompted, prompts, exp.seed)
    segments = split_model(prompted, cut_points(prompted, cut, tail))
    trained = {
        n
        for n, _ in prompted.named_parameters()
        if n == "prompts" or segments[-1].owns(n)
    }
    _trainable(prompted, trained)
    head, last, split = split_costs(prompted)
    with torch.no_grad():
        score = counted(lambda: last(head(x)))
    local = counted(lambda: F.cross_entropy(last(head(x)), y).backward())
    return {
        name: value / b
        for name, value in {
            "full": full,
            "ushape": ushape,
            "score": score,
            "local": local,
            "split": split,
        }.items()
    }


def per_round(
    exp: Any, *, cut: str, tail: str, prompts: int, keep: float, local_epochs: int
) -> dict[str, float]:
    """Client training FLOPs of one round, all clients together, per method
    (``fedavg-full-ft``, ``split-ushape``, ``sfprompt``)."""
    unit = per_example(exp, cut=cut, tail=tail, prompts=prompts)
    data = federated_data(exp.data, exp.federation.clients, exp.seed)
    epochs = exp.train.epochs
    out = {"fedavg-full-ft": 0.0, "split-ushape": 0.0, "sfprompt": 0.0}
    for pid in range(exp.federation.clients):
        n = len(data.client(pid).train)
        k = keep_count(n, keep)
        out["fedavg-full-ft"] += epochs * n * unit["full"]
        out["split-ushape"] += epochs * n * unit["ushape"]
        out["sfprompt"] += (
            n * unit["score"]
            + local_epochs * k * unit["local"]
            + epochs * k * unit["split"]
        )
    return out
