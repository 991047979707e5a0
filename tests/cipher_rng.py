"""Test inputs for the secure-aggregation tests, drawn from a ChaCha20 keystream.

The masks of fedmq's secure aggregation come only from :func:`fedmq.secagg.crypto.expand_mask`
(AES-CTR from ``cryptography``). The tests' own random values (model weights, updates, the
inputs that get masked) come from here, so no non-cryptographic generator appears in a file
that masks, and no reader has to check that a numpy draw is not a mask. Deterministic per
``seed``, with the few methods of :class:`numpy.random.Generator` those tests use.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

Size = int | tuple[int, ...] | None


class CipherRng:
    """Uniform, normal and integer draws from ChaCha20 keyed by SHA-256 of ``seed``."""

    def __init__(self, seed: int) -> None:
        key = hashlib.sha256(b"fedmq test inputs %d" % seed).digest()
        self._stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()

    def _words(self, count: int) -> npt.NDArray[np.uint64]:
        return np.frombuffer(self._stream.update(bytes(8 * count)), dtype="<u8").astype(np.uint64)

    @staticmethod
    def _count(size: Size) -> int:
        return 1 if size is None else int(np.prod(size))

    @staticmethod
    def _shaped(values: npt.NDArray[Any], size: Size) -> Any:
        return values[0].item() if size is None else values.reshape(size)

    def random(self, size: Size = None) -> Any:
        """Floats in [0, 1) with 53 random bits each."""
        values = (self._words(self._count(size)) >> np.uint64(11)).astype(np.float64) * 2.0**-53
        return self._shaped(values, size)

    def uniform(self, low: float = 0.0, high: float = 1.0, size: Size = None) -> Any:
        """Floats in [low, high)."""
        values = low + (high - low) * np.asarray(self.random(self._count(size)))
        return self._shaped(values, size)

    def normal(self, loc: float = 0.0, scale: float = 1.0, size: Size = None) -> Any:
        """Gaussian floats (Box-Muller)."""
        n = self._count(size)
        u1 = 1.0 - np.asarray(self.random(n))  # in (0, 1]: the log is finite
        u2 = np.asarray(self.random(n))
        values = loc + scale * np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
        return self._shaped(values, size)

    def integers(self, low: int, high: int, size: Size = None, dtype: Any = np.int64) -> Any:
        """Integers in [low, high); the modulo's bias is at most (high - low) / 2**64."""
        span = high - low
        if not 0 < span <= 2**64:
            raise ValueError(f"empty or too wide range [{low}, {high})")
        words = self._words(self._count(size))
        values = words if span == 2**64 else words % np.uint64(span)
        if span <= 2**63:  # fits int64 with its (possibly negative) offset
            return self._shaped((values.astype(np.int64) + low).astype(dtype), size)
        if low < 0:
            raise ValueError(f"a range wider than 2**63 must start at 0 or above, got {low}")
        return self._shaped((values + np.uint64(low)).astype(dtype), size)
