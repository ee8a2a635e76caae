"""AMAQ: adaptive mixed-bit activation quantization across the cut.

Song, Yang, Harris and Abdu Jyothi, "AMAQ: Adaptive Mixed-bit Activation
Quantization for Collaborative Parameter Efficient Fine-tuning" (arXiv
2510.05468, 2025). Every channel ``c`` of the tensor that crosses the cut has a
learnable gate ``Q_c``; its bit width is

    b_c = min_bits + (max_bits - min_bits) * sigmoid(alpha * Q_c)

(the paper's formula), rounded to an integer for the wire. A bit-regularisation
term pulls the mean bit width down to a target that anneals from
``start_bits`` (about 8) to ``end_bits`` (about 4) over the run, while the task
loss, through a straight-through estimator, pushes the bits of the channels whose
quantisation error hurts back up: the budget goes where it matters.

Quantisation is per channel and asymmetric (min-max): with ``lo_c``, ``hi_c`` the
channel's range and ``k_c`` its integer bit width,

    scale_c = (hi_c - lo_c) / (2**k_c - 1),  q = round((x - lo_c) / scale_c),
    x_hat = lo_c + scale_c * q,  so |x - x_hat| <= scale_c / 2.

On the wire the integers are bit-packed, channel after channel, each with its own
``k_c`` bits (:func:`pack_channels`), next to the float32 ``lo``/``scale`` and
the uint8 ``bits`` of every channel, so the bytes a message carries are the real
compressed size: ``ceil(n * sum_c k_c / 8)`` bytes of integers plus 9 bytes per
channel, ``n`` values per channel.

The channel axis is 1 for 4-d tensors (a CNN's ``N, C, H, W``) and the last axis
otherwise (an MLP's ``N, D``, a transformer's ``N, T, D``).

Deviations from the paper (whose code is not public; the formulas below are this
module's, written from the paper's description):

- The bit-regularisation term is ``weight * relu(mean(b) - target(t))**2`` with
  ``target`` linear in the run's progress ``t`` from ``start_bits`` to
  ``end_bits``; the paper describes a bit regularisation that moves the bits
  from 6-8 to 3-4 over training without a formula we could retrieve.
- The gate's gradient from the task loss comes through the step size (the
  learned-step-size STE: ``d x_hat / d scale = round(u) - u``) and a
  straight-through rounding of ``b_c``.
- Gradients down the cut reuse the bit widths the activations came up with (one
  gate per cut tensor, learned on the client): the server has no loss term that
  could learn a gate of its own. In U-shaped split learning the second cut (the
  body's output down, its gradient up) goes at the same bit widths when it has
  as many channels (the ViT's tokens), else at ``start_bits``; only the first
  cut's quantisation trains the gate.
- Each client learns its own gate (kept in its ``context.state``, never
  averaged); the paper trains one client-server pair.
- The gate's optimiser is Adam (learning rate ``split.amaq-lr``), apart from
  the model's, as in the paper; its slope ``alpha`` is 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

#: Dtype of the per-channel bit widths on the wire.
BITS_DTYPE = np.uint8
#: Smallest channel range; a constant channel quantises to its value exactly.
MIN_RANGE = 1e-12


def channel_axis(ndim: int) -> int:
    """The channel axis of a tensor with ``ndim`` dimensions (see module doc)."""
    return 1 if ndim == 4 else ndim - 1


def to_channels(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a ``(channels, values)`` matrix (channel axis moved first)."""
    return x.movedim(channel_axis(x.ndim), 0).reshape(x.shape[channel_axis(x.ndim)], -1)


def from_channels(rows: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`to_channels` for a tensor of ``shape``."""
    axis = channel_axis(len(shape))
    moved = (shape[axis], *shape[:axis], *shape[axis + 1 :])
    return rows.reshape(moved).movedim(0, axis)


def gate_bits(
    gate: torch.Tensor, *, min_bits: int, max_bits: int, alpha: float = 1.0
) -> torch.Tensor:
    """Continuous bit widths ``min + (max - min) * sigmoid(alpha * gate)``."""
    return min_bits + (max_bits - min_bits) * torch.sigmoid(alpha * gate)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def channel_range(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row minimum and range (at least :data:`MIN_RANGE`), detached."""
    rows = rows.detach()
    lo = rows.min(dim=1).values
    return lo, (rows.max(dim=1).values - lo).clamp_min(MIN_RANGE)


def quantize_rows(
    rows: torch.Tensor, bits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integers, minima and step sizes of ``rows`` at ``bits`` (integer-valued)."""
    lo, span = channel_range(rows)
    scale = span / (2.0**bits - 1)
    q = torch.round((rows.detach() - lo[:, None]) / scale.detach()[:, None])
    return q, lo, scale


def dequantize_rows(
    q: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """``lo + scale * q`` per row (the decoder's arithmetic)."""
    return lo[:, None] + scale[:, None] * q


def fake_quantize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """``x`` quantised per channel at ``bits`` (continuous, one per channel).

    Forward: exactly what :class:`AmaqCodec` decodes from the packed message
    (bits rounded to integers). Backward: identity to ``x``; to ``bits`` through
    the step size, ``d x_hat / d scale = round(u) - u`` with ``u = (x - lo) /
    scale``, and the straight-through rounding of the bits.
    """
    rows = to_channels(x)
    lo, span = channel_range(rows)
    scale = span / (2.0 ** round_ste(bits) - 1)
    q = torch.round((rows.detach() - lo[:, None]) / scale.detach()[:, None])
    # Value: lo + scale.detach() * q (the decoder's numbers, bit for bit);
    # gradient: 1 to x, (q - u) to scale.
    u = (rows.detach() - lo[:, None]) / scale.detach()[:, None]
    out = dequantize_rows(q, lo, scale.detach()) + (rows - rows.detach())
    out = out + (scale - scale.detach())[:, None] * (q - u)
    return from_channels(out, tuple(x.shape))


def bit_target(progress: float, *, start_bits: float, end_bits: float) -> float:
    """Target mean bit width at ``progress`` in [0, 1] of the run (linear)."""
    t = min(max(progress, 0.0), 1.0)
    return start_bits + (end_bits - start_bits) * t


def bit_penalty(bits: torch.Tensor, target: float, weight: float) -> torch.Tensor:
    """``weight * relu(mean(bits) - target)**2``: only a budget overrun costs."""
    return weight * torch.relu(bits.mean() - target) ** 2


def pack_channels(q: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """Bit-pack a ``(channels, n)`` integer matrix, row ``c`` at ``bits[c]`` bits.

    The bit stream holds row 0's values (``bits[0]`` bits each, least
    significant first), then row 1's, ...; padded to whole bytes. Its length is
    ``ceil(n * sum(bits) / 8)`` bytes.
    """
    q = np.asarray(q, dtype=np.uint32)
    pieces = []
    for row, k in zip(q, bits, strict=True):
        planes = (row[:, None] >> np.arange(int(k), dtype=np.uint32)) & 1
        pieces.append(planes.astype(np.uint8).ravel())
    stream = np.concatenate(pieces) if pieces else np.zeros(0, np.uint8)
    return np.packbits(stream, bitorder="little")


def unpack_channels(packed: np.ndarray, bits: np.ndarray, n: int) -> np.ndarray:
    """Inverse of :func:`pack_channels`: the ``(channels, n)`` integers."""
    stream = np.unpackbits(packed, bitorder="little")
    rows = np.zeros((len(bits), n), dtype=np.int64)
    at = 0
    for c, k in enumerate(int(b) for b in bits):
        planes = stream[at : at + n * k].reshape(n, k).astype(np.int64)
        rows[c] = planes @ (1 << np.arange(k, dtype=np.int64))
        at += n * k
    return rows


def packed_nbytes(n: int, bits: np.ndarray) -> int:
    """Bytes of the packed integers: ``ceil(n * sum(bits) / 8)``."""
    return math.ceil(n * int(np.sum(bits)) / 8)


def encode_at(values: np.ndarray, bits: np.ndarray) -> dict[str, np.ndarray]:
    """Pack ``values`` at per-channel ``bits`` (integers).

    Returns ``{"packed": uint8, "lo": float32 (C,), "scale": float32 (C,),
    "bits": uint8 (C,), "shape": int64}``; :func:`decode_arrays` inverts it.
    """
    x = torch.as_tensor(np.asarray(values, dtype=np.float32))
    bits = np.asarray(bits).astype(BITS_DTYPE)
    q, lo, scale = quantize_rows(to_channels(x), torch.as_tensor(bits).float())
    return {
        "packed": pack_channels(q.numpy().astype(np.int64), bits),
        "lo": lo.numpy(),
        "scale": scale.numpy(),
        "bits": bits,
        "shape": np.asarray(x.shape, dtype=np.int64),
    }


def decode_arrays(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """The float32 values ``lo + scale * q`` of :func:`encode_at`'s arrays."""
    shape = tuple(int(s) for s in arrays["shape"])
    bits = np.asarray(arrays["bits"])
    n = math.prod(shape) // max(len(bits), 1)
    q = torch.as_tensor(unpack_channels(arrays["packed"], bits, n)).float()
    lo, scale = torch.as_tensor(arrays["lo"]), torch.as_tensor(arrays["scale"])
    return from_channels(dequantize_rows(q, lo, scale), shape).numpy()


class AmaqGate(nn.Module):
    """The learnable per-channel gate of one cut tensor.

    Parameters
    ----------
    channels : int
        Channels of the cut tensor.
    min_bits, max_bits : int
        Range of the bit widths.
    start_bits : float
        Initial bit width of every channel (the gate starts at the matching
        logit, kept inside the sigmoid's responsive range).
    alpha : float
        Slope of the sigmoid.
    """

    def __init__(
        self,
        channels: int,
        *,
        min_bits: int,
        max_bits: int,
        start_bits: float,
        alpha: float = 1.0,
    ):
        super().__init__()
        if not 1 <= min_bits < max_bits <= 16:
            raise ValueError(
                f"bit widths: need 1 <= min_bits < max_bits <= 16, got "
                f"{min_bits}, {max_bits}"
            )
        self.min_bits, self.max_bits, self.alpha = min_bits, max_bits, alpha
        frac = (start_bits - min_bits) / (max_bits - min_bits)
        frac = min(max(frac, 0.05), 0.95)
        logit = math.log(frac / (1 - frac)) / alpha
        self.gate = nn.Parameter(torch.full((channels,), logit))

    def bits(self) -> torch.Tensor:
        """Continuous bit widths (differentiable in the gate)."""
        return gate_bits(
            self.gate, min_bits=self.min_bits, max_bits=self.max_bits, alpha=self.alpha
        )

    def wire_bits(self) -> np.ndarray:
        """Integer bit widths that go on the wire."""
        return torch.round(self.bits().detach()).numpy().astype(BITS_DTYPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as the receiver will decode it, differentiable in the gate."""
        return fake_quantize(x, self.bits())


class Amaq:
    """The ``amaq`` codec of ``split.quantization``, and its learning on the
    sender of the activations.

    As a codec (``encode(values) -> arrays``, ``decode(arrays) -> values``, see
    :mod:`fedsim.learn.codecs`) it packs each channel at its own bit width. The
    bit widths of a tensor with ``C`` channels are, in this order: the learnable
    gate's (the client's, once :meth:`backward` has created it for ``C``), the
    last bit widths this codec decoded for ``C`` channels (the server answers
    the activations' gradient at the activations' bit widths), else
    ``start_bits``.

    As the client's learner, :meth:`backward` replaces ``out.backward(gradient)``:
    it runs the cut tensor through the gate (what the server decoded, exactly),
    backpropagates the received gradient plus the bit penalty towards the
    annealed target, and steps the gate's own Adam optimiser (the gate is
    optimised apart from the model, as in the paper). :meth:`state` /
    :meth:`load` carry the gate and its optimiser between messages.

    Parameters
    ----------
    min_bits, max_bits : int
        ``split.min-bits`` / ``split.max-bits``.
    start_bits, end_bits : float
        The mean bit width the budget anneals from and to over the run.
    weight : float
        Weight of the bit penalty.
    lr : float
        Learning rate of the gate's Adam optimiser.
    """

    def __init__(
        self,
        *,
        min_bits: int,
        max_bits: int,
        start_bits: float = 8.0,
        end_bits: float = 4.0,
        weight: float = 10.0,
        lr: float = 0.2,
    ):
        if not 1 <= min_bits < max_bits <= 16:
            raise ValueError(
                f"bit widths: need 1 <= min_bits < max_bits <= 16, got "
                f"{min_bits}, {max_bits}"
            )
        self.min_bits, self.max_bits = min_bits, max_bits
        self.start_bits = min(max(start_bits, min_bits), max_bits)
        self.end_bits = min(max(end_bits, min_bits), max_bits)
        self.weight, self.lr = weight, lr
        self.gate: AmaqGate | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.received: dict[int, np.ndarray] = {}
        self.sent_bits: list[float] = []

    # -- the codec -------------------------------------------------------------
    def bits_for(self, channels: int) -> np.ndarray:
        """The integer bit widths a tensor of ``channels`` channels goes out at."""
        if self.gate is not None and len(self.gate.gate) == channels:
            return self.gate.wire_bits()
        if channels in self.received:
            return self.received[channels]
        return np.full(channels, round(self.start_bits), dtype=BITS_DTYPE)

    def encode(self, values: np.ndarray) -> dict[str, np.ndarray]:
        bits = self.bits_for(values.shape[channel_axis(values.ndim)])
        self.sent_bits.append(float(bits.mean()))
        return encode_at(values, bits)

    def decode(self, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        bits = np.asarray(arrays["bits"], dtype=BITS_DTYPE)
        self.received[len(bits)] = bits
        return decode_arrays(arrays)

    # -- learning on the client -------------------------------------------------
    def ensure_gate(self, channels: int) -> AmaqGate:
        """The gate for ``channels`` channels (new at ``start_bits`` if none)."""
        if self.gate is None or len(self.gate.gate) != channels:
            self.gate = AmaqGate(
                channels,
                min_bits=self.min_bits,
                max_bits=self.max_bits,
                start_bits=self.start_bits,
            )
            self.optimizer = torch.optim.Adam(self.gate.parameters(), lr=self.lr)
        return self.gate

    def backward(
        self, out: torch.Tensor, gradient: torch.Tensor, *, progress: float
    ) -> None:
        """Backpropagate ``gradient`` (of the decoded cut tensor) into ``out``'s
        graph through the gate, add the bit penalty at ``progress`` of the run,
        and step the gate."""
        gate = self.ensure_gate(out.shape[channel_axis(out.ndim)])
        gate.to(out.device)
        assert self.optimizer is not None
        self.optimizer.zero_grad(set_to_none=True)
        target = bit_target(
            progress, start_bits=self.start_bits, end_bits=self.end_bits
        )
        bits = gate.bits()
        loss = (gate(out) * gradient).sum() + bit_penalty(bits, target, self.weight)
        loss.backward()
        self.optimizer.step()

    def state(self) -> dict[str, torch.Tensor]:
        """The gate and its optimiser's moments (empty before the first step)."""
        if self.gate is None or self.optimizer is None:
            return {}
        out = {"gate": self.gate.gate.detach().cpu().clone()}
        for name, value in self.optimizer.state.get(self.gate.gate, {}).items():
            out[f"adam.{name}"] = torch.as_tensor(value).detach().cpu().clone()
        return out

    def load(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state` returned (nothing: no gate yet)."""
        self.gate, self.optimizer = None, None
        if "gate" not in state:
            return
        gate = torch.as_tensor(np.asarray(state["gate"]))
        self.ensure_gate(len(gate))
        assert self.gate is not None and self.optimizer is not None
        with torch.no_grad():
            self.gate.gate.copy_(gate)
        moments = {
            k.removeprefix("adam."): torch.as_tensor(np.asarray(v))
            for k, v in state.items()
            if k.startswith("adam.")
        }
        if moments:
            self.optimizer.state[self.gate.gate] = moments

    def mean_sent_bits(self) -> float:
        """Mean bit width of what this codec encoded since the last call
        (nan if nothing); resets the tally."""
        sent, self.sent_bits = self.sent_bits, []
        return float(np.mean(sent)) if sent else float("nan")


def amaq_codec(options: Any) -> Amaq:
    """``CODECS["amaq"]``: the codec from a family's ``[split]`` options."""
    return Amaq(
        min_bits=options.min_bits,
        max_bits=options.max_bits,
        start_bits=options.amaq_start_bits,
        end_bits=options.amaq_end_bits,
        weight=options.amaq_weight,
        lr=options.amaq_lr,
    )
