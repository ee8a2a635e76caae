"""Codecs for what crosses a split-learning cut (activations up, gradients down).

A codec turns a float array into the arrays a message carries and back:
``encode(values) -> dict[str, np.ndarray]`` and ``decode(arrays) -> np.ndarray``.
What is sent is exactly the encoded arrays, so their bytes are the compressed
size that the engine records. Codecs are registered by name in :data:`CODECS`
(``split.quantization``); a factory takes the family's option table, so an
adaptive codec can read its own keys (``split.min-bits``, ``split.max-bits``).

The fixed-width codecs quantize per channel (the channel axis is 1 for 4-D
``(batch, channels, height, width)`` tensors, the last axis otherwise) with an
affine map: channel ``c`` with minimum ``lo_c`` and maximum ``hi_c`` gets
``scale_c = (hi_c - lo_c) / (2**bits - 1)`` and zero point ``lo_c`` (the value
of code 0, kept as a float so that no value is clipped); a value ``v`` becomes
``round((v - lo_c) / scale_c)``, and decodes to ``code * scale_c + lo_c``, off
by at most ``scale_c / 2``. ``int4`` packs two codes per byte.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np


class Codec(Protocol):
    """Encodes a float array into message arrays and decodes them back."""

    def encode(self, values: np.ndarray) -> dict[str, np.ndarray]: ...

    def decode(self, arrays: Mapping[str, np.ndarray]) -> np.ndarray: ...


class Identity:
    """``none``: the float32 values as they are."""

    def encode(self, values: np.ndarray) -> dict[str, np.ndarray]:
        return {"values": np.ascontiguousarray(values, dtype=np.float32)}

    def decode(self, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        return np.asarray(arrays["values"], dtype=np.float32)


def channel_axis(ndim: int) -> int:
    """The axis whose entries share a scale: channels of NCHW tensors, else the
    last (features, or a transformer's embedding dimension)."""
    return 1 if ndim == 4 else ndim - 1


def to_rows(values: np.ndarray) -> np.ndarray:
    """``values`` as ``(rows, channels)``."""
    moved = np.moveaxis(values, channel_axis(values.ndim), -1)
    return moved.reshape(-1, moved.shape[-1])


def from_rows(rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`to_rows` for an array of ``shape``."""
    axis = channel_axis(len(shape))
    moved = [*shape[:axis], *shape[axis + 1 :], shape[axis]]
    return np.moveaxis(rows.reshape(moved), -1, axis)


def quantize(
    values: np.ndarray, bits: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-channel affine quantization: ``(codes, scale, zero)`` with codes in
    ``[0, 2**bits - 1]`` shaped ``(rows, channels)``."""
    rows = to_rows(np.asarray(values, dtype=np.float32))
    lo, hi = rows.min(axis=0), rows.max(axis=0)
    scale = (hi - lo) / np.float32(2**bits - 1)
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    codes = np.rint((rows - lo) / scale)
    return np.clip(codes, 0, 2**bits - 1).astype(np.uint8), scale, lo.astype(np.float32)


def dequantize(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """Inverse of :func:`quantize` (up to ``scale / 2`` per value)."""
    return (codes.astype(np.float32) * scale + zero).astype(np.float32)


def pack4(codes: np.ndarray) -> np.ndarray:
    """Two 4-bit codes per byte (low nibble first); odd counts padded with 0."""
    flat = codes.reshape(-1)
    if len(flat) % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)


def unpack4(packed: np.ndarray, count: int) -> np.ndarray:
    """The first ``count`` codes of :func:`pack4`'s output."""
    out = np.empty(2 * len(packed), dtype=np.uint8)
    out[0::2], out[1::2] = packed & 0x0F, packed >> 4
    return out[:count]


class FixedBits:
    """``int8`` / ``int4``: per-channel scale and zero point, ``bits`` per value.

    Sends ``codes`` (uint8; two per byte at 4 bits), ``scale`` and ``zero``
    (float32 per channel) and ``shape`` (int64).
    """

    def __init__(self, bits: int):
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits}")
        self.bits = bits

    def encode(self, values: np.ndarray) -> dict[str, np.ndarray]:
        codes, scale, zero = quantize(values, self.bits)
        packed = pack4(codes) if self.bits == 4 else codes.reshape(-1)
        shape = np.asarray(values.shape, dtype=np.int64)
        return {"codes": packed, "scale": scale, "zero": zero, "shape": shape}

    def decode(self, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        shape = tuple(int(s) for s in arrays["shape"])
        channels = shape[channel_axis(len(shape))]
        count = int(np.prod(shape))
        codes = np.asarray(arrays["codes"])
        if self.bits == 4:
            codes = unpack4(codes, count)
        rows = dequantize(codes.reshape(-1, channels), arrays["scale"], arrays["zero"])
        return from_rows(rows, shape)


def amaq(options: Any) -> Codec:
    """AMAQ (:mod:`fedsim.learn.amaq`). It needs torch, which the family
    declarations that check ``split.quantization`` must not import: imported
    when chosen."""
    from fedsim.learn.amaq import amaq_codec

    return amaq_codec(options)


def anneal(options: Any) -> Codec:
    """One bit width for every channel, annealed over the rounds
    (:mod:`fedsim.learn.anneal`, AMAQ's wire format: imported when chosen)."""
    from fedsim.learn.anneal import annealed_codec

    return annealed_codec(options)


def bit_width(value: int) -> str | None:
    """Option check of a bit width the packed wire format carries."""
    return None if 1 <= value <= 16 else "must be in 1..16"


#: ``split.quantization`` name -> factory(options) of the codec. Open: another
#: codec registers itself here (``CODECS["name"] = factory``).
CODECS: dict[str, Callable[[Any], Codec]] = {
    "none": lambda options: Identity(),
    "int8": lambda options: FixedBits(8),
    "int4": lambda options: FixedBits(4),
    "amaq": amaq,
    "anneal": anneal,
}


def codec_name(name: str) -> str | None:
    """Option check of ``split.quantization``: a registered codec."""
    if name in CODECS:
        return None
    return f"is not a codec; use one of {', '.join(sorted(CODECS))}"


def encode(codec: Codec, prefix: str, values: np.ndarray) -> dict[str, np.ndarray]:
    """``codec.encode(values)`` with each array's name prefixed ``<prefix>.``
    (several tensors in one ArrayRecord)."""
    return {f"{prefix}.{k}": v for k, v in codec.encode(values).items()}


def decode(codec: Codec, prefix: str, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """Inverse of :func:`encode`."""
    start = f"{prefix}."
    own = {k[len(start) :]: v for k, v in arrays.items() if k.startswith(start)}
    return codec.decode(own)
