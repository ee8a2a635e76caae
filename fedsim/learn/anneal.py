"""A uniform bit width annealed over the rounds: AMAQ's fixed-precision
comparator at AMAQ's budget.

``split.quantization = "anneal"`` quantises every channel of every tensor that
crosses the cut at one integer bit width, the same for all channels and all
clients, which falls uniformly over the run from ``split.anneal-start-bits``
to ``split.anneal-end-bits``: in round ``r`` of ``R``,

    b(r) = floor(start + (end - start) * (r - 1) / (R - 1) + 1/2)

(``b = start`` when ``R = 1``; halves round up). It is the schedule AMAQ's
budget follows (:func:`fedsim.learn.amaq.bit_target`, 8 -> 4 bits by default),
without AMAQ's learned per-channel allocation, so the two differ in exactly
that. With ``start == end`` it is fixed precision at any width from 1 to 16
(e.g. 6 bits, the mean of the 8 -> 4 schedule).

The wire format is AMAQ's (:func:`fedsim.learn.amaq.encode_at`: per-channel
min-max quantisation, the integers bit-packed, float32 minimum and step and a
uint8 bit width per channel), so the recorded bytes of the two compare bit for
bit. The sender of the activations (the client) sets the round with
:meth:`Annealed.at_round`; the other side (the server) answers a tensor at the
bit widths it last decoded for that many channels, as AMAQ's codec does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedsim.learn.amaq import (
    BITS_DTYPE,
    bit_target,
    channel_axis,
    decode_arrays,
    encode_at,
)

#: Bit widths the wire format carries (uint8 widths, uint32 packing).
MIN_BITS, MAX_BITS = 1, 16


def scheduled_bits(
    server_round: int, rounds: int, *, start_bits: int, end_bits: int
) -> int:
    """The bit width of round ``server_round`` (1-based) of ``rounds``."""
    if rounds < 1 or not 1 <= server_round <= rounds:
        raise ValueError(f"round {server_round} is not in 1..{rounds}")
    progress = (server_round - 1) / (rounds - 1) if rounds > 1 else 0.0
    target = bit_target(progress, start_bits=start_bits, end_bits=end_bits)
    return math.floor(target + 0.5)


class Annealed:
    """The ``anneal`` codec of ``split.quantization``.

    Parameters
    ----------
    start_bits, end_bits : int
        ``split.anneal-start-bits`` / ``split.anneal-end-bits``, in 1..16.
    """

    def __init__(self, *, start_bits: int, end_bits: int):
        for name, value in (("start_bits", start_bits), ("end_bits", end_bits)):
            if not MIN_BITS <= value <= MAX_BITS or int(value) != value:
                raise ValueError(
                    f"{name}: need an integer in {MIN_BITS}..{MAX_BITS}, got {value}"
                )
        self.start_bits, self.end_bits = int(start_bits), int(end_bits)
        #: The round's bit width once :meth:`at_round` set it (the sender).
        self.bits: int | None = None
        self.received: dict[int, np.ndarray] = {}

    def at_round(self, server_round: int, rounds: int) -> None:
        """Send at round ``server_round``'s bit width from now on."""
        self.bits = scheduled_bits(
            server_round, rounds, start_bits=self.start_bits, end_bits=self.end_bits
        )

    def bits_for(self, channels: int) -> np.ndarray:
        """The bit widths a tensor of ``channels`` channels goes out at: the
        round's (the sender), else the last decoded for as many channels (the
        answering side), else ``start_bits``."""
        if self.bits is not None:
            return np.full(channels, self.bits, dtype=BITS_DTYPE)
        if channels in self.received:
            return self.received[channels]
        return np.full(channels, self.start_bits, dtype=BITS_DTYPE)

    def encode(self, values: np.ndarray) -> dict[str, np.ndarray]:
        return encode_at(values, self.bits_for(values.shape[channel_axis(values.ndim)]))

    def decode(self, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        bits = np.asarray(arrays["bits"], dtype=BITS_DTYPE)
        self.received[len(bits)] = bits
        return decode_arrays(arrays)


def annealed_codec(options: Any) -> Annealed:
    """``CODECS["anneal"]``: the codec from a family's ``[split]`` options."""
    return Annealed(
        start_bits=options.anneal_start_bits, end_bits=options.anneal_end_bits
    )
