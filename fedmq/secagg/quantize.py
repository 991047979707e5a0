"""Fixed-point encoding of updates into integers mod ``2^bits``, and back.

A device sends ``x`` as ``q(x) = stochastic_round(scale * clamp(x, -r, r)) mod 2^bits``, two's
complement. Stochastic rounding makes ``q`` unbiased (``E[q(x)] = scale * x``), so the error of
a sum of ``n`` encoded values is zero in expectation and at most ``n / scale`` per coordinate.
The scale leaves room for ``n`` summands: ``n * (scale * r + 1) < 2^(bits - 1)``, so the sum of
the integers mod ``2^bits``, read as signed, is exactly the sum of the integers, and dividing by
``scale`` gives the sum of the clamped values within ``n / scale`` (``dequantize``).

All arithmetic is in unsigned integers of the ring's width (:func:`ring_dtype`: ``uint32`` up to
32 bits, else ``uint64``): numpy's wrap-around mod ``2^32`` or ``2^64`` agrees with mod
``2^bits``, so masks and values can be added freely and reduced once.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from fedmq.secagg.crypto import Uniform
from fedmq.secagg.crypto import uniform as crypto_uniform

U64 = npt.NDArray[np.unsignedinteger[Any]]
"""Integers mod ``2^bits`` in the ring's dtype (the name stayed from when it was always 64-bit)."""


def ring_dtype(bits: int) -> np.dtype[Any]:
    """The dtype the ring's arithmetic runs in: 32-bit words up to 32 bits (half the memory), else 64."""
    return np.dtype(np.uint32) if bits <= 32 else np.dtype(np.uint64)


def scale_for(bits: int, clip_range: float, summands: int) -> float:
    """The largest power-of-two scale at which ``summands`` values in ``[-clip_range, clip_range]`` sum exactly."""
    if not 8 <= bits <= 62:
        raise ValueError(f"bits must be in [8, 62], got {bits}")
    if not (clip_range > 0 and summands >= 1):
        raise ValueError("need clip_range > 0 and summands >= 1")
    room = (2 ** (bits - 1) - 1) / summands - 1  # scale * r + 1 <= room
    if room < 2:
        raise ValueError(f"{bits} bits cannot hold a sum of {summands} values")
    return float(2 ** np.floor(np.log2(room / clip_range)))


def quantize(
    x: npt.NDArray[Any], *, scale: float, clip_range: float, bits: int, uniform: Uniform = crypto_uniform
) -> U64:
    """Encode ``x`` (clamped to ``[-clip_range, clip_range]``) as integers mod ``2^bits``, stochastic rounding.

    ``uniform`` draws the rounding's randomness (a cryptographic stream by default; injectable).
    """
    v = np.clip(np.asarray(x, dtype=np.float64).ravel(), -clip_range, clip_range) * scale
    low = np.floor(v)
    ints = (low + (uniform(v.size) < (v - low))).astype(np.int64)
    return reduce(ints.view(np.uint64), bits).astype(ring_dtype(bits))


def reduce(v: U64, bits: int) -> U64:
    """``v mod 2^bits``."""
    if bits == 8 * v.dtype.itemsize:
        return v
    return v & v.dtype.type((1 << bits) - 1)


def dequantize(v: U64, *, scale: float, bits: int) -> npt.NDArray[np.float64]:
    """Read integers mod ``2^bits`` as signed and divide by ``scale``."""
    v = reduce(v, bits).astype(np.int64)
    half = np.int64(1 << (bits - 1))
    signed = np.where(v >= half, v - np.int64(1 << bits), v) if bits < 64 else v
    return signed.astype(np.float64) / scale


def wire_dtype(bits: int) -> np.dtype[Any]:
    """What a masked vector travels as: 4 bytes per value up to 32 bits, else 8."""
    return np.dtype("<u4") if bits <= 32 else np.dtype("<u8")
