"""Update compression on the wire: float16, int8 with a per-tensor scale, top-k sparsification.

The agent compresses its (clipped, noised) delta as the last step of its release pipeline
(``edge_agent.pipeline.CompressStep``, with error feedback); the aggregator's decoder turns
every form back into a dense float32 tensor before validation, so the aggregation core and
its rules never see a compressed tensor.

Wire forms of one tensor in an update's ``delta`` map (all msgpack, no extension types):

* plain: ``{"dtype", "shape", "data"}`` (see :mod:`fedmq.codec`); ``float16`` is the fp16 form
  and decodes to float32;
* int8: ``{"enc": "int8", "shape", "scale": float, "data": bin}``; value = ``q * scale`` with
  ``q`` in [-127, 127] (symmetric per-tensor quantization; Jacob et al., CVPR 2018);
* top-k: ``{"enc": "topk", "shape", "index": bin, "value": bin}`` with strictly increasing
  little-endian uint32 indices into the flattened tensor and float32 values; every other
  entry is zero (Aji & Heafield, EMNLP 2017; error feedback as in Stich et al., NeurIPS 2018).

Decoding validates everything before use: shapes against byte lengths, indices in range and
strictly increasing, scale and values finite *as float32*, the type the aggregator computes in
(a float64 scale that is finite on the wire can still overflow once decoded). The aggregation
core checks finiteness and range once more on exactly the dense tensors its rule will use
(``aggregator.core``): that is the gate every form, present or future, passes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fedmq.codec import (
    DEFAULT_LIMITS,
    DTYPES,
    DecodeLimits,
    Tensors,
    all_finite,
    decode_tensor,
    encode_tensor,
    named_items,
    wire_bin,
    wire_shape,
)
from fedmq.errors import DecodeError, RejectReason

METHODS = ("none", "fp16", "int8", "topk")
"""Compression methods an agent can be configured with (``agent.compression``)."""

_F32 = DTYPES["float32"]
_U32 = np.dtype("<u4")
_F32_TINY = float(np.finfo(np.float32).tiny)
_F32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class Quantized:
    """A tensor as int8 codes and one float32 scale: ``value = q * scale``."""

    q: npt.NDArray[np.int8]
    scale: float

    def dense(self) -> npt.NDArray[np.float32]:
        """The float32 tensor the aggregator reconstructs."""
        return self.q.astype(np.float32) * np.float32(self.scale)

    def to_wire(self) -> dict[str, Any]:
        """The wire map (the codes as a view, not a copy)."""
        return {"enc": "int8", "shape": list(self.q.shape), "scale": float(self.scale), "data": _bytes_view(self.q)}


@dataclass(frozen=True)
class Sparse:
    """A tensor as its largest-magnitude entries: flat indices (increasing) and float32 values."""

    shape: tuple[int, ...]
    index: npt.NDArray[np.uint32]
    value: npt.NDArray[np.float32]

    def dense(self) -> npt.NDArray[np.float32]:
        """The float32 tensor the aggregator reconstructs (zeros elsewhere)."""
        out = np.zeros(math.prod(self.shape), dtype=np.float32)
        out[self.index] = self.value
        return out.reshape(self.shape)

    def to_wire(self) -> dict[str, Any]:
        """The wire map (index and value as views)."""
        return {
            "enc": "topk",
            "shape": list(self.shape),
            "index": _bytes_view(self.index),
            "value": _bytes_view(self.value),
        }


WireTensor = npt.NDArray[Any] | Quantized | Sparse
"""What an update's delta may hold on the agent side before encoding."""


def _bytes_view(arr: npt.NDArray[Any]) -> memoryview:
    flat: Any = np.ascontiguousarray(arr).reshape(-1)  # numpy arrays implement the buffer protocol
    return memoryview(flat).cast("B")


def compress(method: str, x: npt.NDArray[np.floating[Any]], *, topk_fraction: float = 0.01) -> WireTensor:
    """Compress one float tensor with ``method`` (one of :data:`METHODS`)."""
    if method == "none":
        return x
    if method == "fp16":
        half: npt.NDArray[np.float16] = np.clip(x, -65504, 65504).astype(np.float16)
        return half
    if method == "int8":
        peak = float(np.max(np.abs(x))) if x.size else 0.0
        # At least float32's smallest normal number, so that 1 / scale stays finite in float32
        # (a subnormal peak would divide by zero); entries that small quantize to 0.
        scale = max(peak / 127.0, _F32_TINY) if peak > 0 and math.isfinite(peak) else 1.0
        q = np.rint(x * np.float32(1.0 / scale)).clip(-127, 127).astype(np.int8)
        return Quantized(q, scale)
    if method == "topk":
        if not 0 < topk_fraction <= 1:
            raise ValueError(f"topk_fraction must be in (0, 1], got {topk_fraction}")
        flat = np.asarray(x, dtype=np.float32).reshape(-1)
        k = max(1, math.ceil(topk_fraction * flat.size)) if flat.size else 0
        if k >= flat.size:
            index = np.arange(flat.size, dtype=np.uint32)
        else:
            index = np.sort(np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :]).astype(np.uint32)
        return Sparse(tuple(x.shape), index, flat[index])
    raise ValueError(f"unknown compression {method!r}; use one of {', '.join(METHODS)}")


def dense(t: WireTensor) -> npt.NDArray[Any]:
    """The tensor a compressed form stands for (float16 widened to float32)."""
    if isinstance(t, (Quantized, Sparse)):
        return t.dense()
    return t.astype(np.float32) if t.dtype == np.float16 else t


def encode_wire(t: WireTensor) -> dict[str, Any]:
    """The wire map of a plain or compressed tensor."""
    if isinstance(t, (Quantized, Sparse)):
        return t.to_wire()
    return encode_tensor(t)


def decode_delta(obj: Any, *, where: str, limits: DecodeLimits = DEFAULT_LIMITS) -> Tensors:
    """Decode an update's ``delta`` map, plain or compressed, into dense tensors.

    float16 and compressed tensors come back as float32 (new arrays); plain float32 tensors
    are read-only views of the payload, as :func:`fedmq.codec.decode_tensor` returns them.

    Raises:
        DecodeError: ``bad_field``, ``bad_dtype``, ``shape_mismatch``, ``non_finite`` or ``too_large``.
    """
    out: Tensors = {}
    for name, t, at in named_items(obj, where=where, limits=limits):
        if isinstance(t, dict) and "enc" in t:
            out[name] = _decode_compressed(t, where=at, limits=limits)
        else:
            arr = decode_tensor(t, where=at, limits=limits)
            out[name] = arr.astype(np.float32) if arr.dtype == np.float16 else arr
    return out


def _shape(obj: Mapping[str, Any], where: str, limits: DecodeLimits) -> tuple[int, ...]:
    shape = wire_shape(obj, where=where, limits=limits)
    if math.prod(shape) * 4 > limits.max_payload_bytes:  # the dense float32 tensor this would allocate
        raise DecodeError(RejectReason.TOO_LARGE, f"{where}: shape {shape} expands past the payload limit")
    return tuple(shape)


def _decode_compressed(obj: dict[str, Any], *, where: str, limits: DecodeLimits) -> npt.NDArray[np.float32]:
    enc = obj.get("enc")
    if enc == "int8":
        if set(obj) != {"enc", "shape", "scale", "data"}:
            raise DecodeError(RejectReason.BAD_FIELD, f"{where}: an int8 tensor is exactly enc, shape, scale, data")
        shape = _shape(obj, where, limits)
        scale = obj["scale"]
        if type(scale) is not float or not (math.isfinite(scale) and scale > 0):
            raise DecodeError(RejectReason.NON_FINITE, f"{where}: scale must be a finite float > 0")
        data = wire_bin(obj, "data", where=where)
        if len(data) != math.prod(shape):
            raise DecodeError(
                RejectReason.SHAPE_MISMATCH, f"{where}: shape {list(shape)} needs {math.prod(shape)} bytes"
            )
        q = np.frombuffer(data, dtype=np.int8).reshape(shape)
        # The scale is a float64 on the wire: finite there, it can still overflow float32, alone
        # or times the codes (1e300 was accepted once and made the model NaN). Checked before use.
        peak = int(np.abs(q.astype(np.int16)).max()) if q.size else 0
        if scale > _F32_MAX or peak * scale > _F32_MAX:
            raise DecodeError(
                RejectReason.NON_FINITE,
                f"{where}: scale {scale:.3g} x code {peak} overflows float32 (Inf once decoded)",
            )
        return Quantized(q, scale).dense()
    if enc == "topk":
        if set(obj) != {"enc", "shape", "index", "value"}:
            raise DecodeError(RejectReason.BAD_FIELD, f"{where}: a top-k tensor is exactly enc, shape, index, value")
        shape = _shape(obj, where, limits)
        index_b, value_b = wire_bin(obj, "index", where=where), wire_bin(obj, "value", where=where)
        if len(index_b) % 4 or len(index_b) != len(value_b) or len(index_b) // 4 > math.prod(shape):
            raise DecodeError(
                RejectReason.SHAPE_MISMATCH, f"{where}: index and value must be equally many 4-byte items, <= size"
            )
        index = np.frombuffer(index_b, dtype=_U32)
        value = np.frombuffer(value_b, dtype=_F32)
        if index.size and (
            int(index[-1]) >= math.prod(shape) or (index.size > 1 and not np.all(index[1:] > index[:-1]))
        ):
            raise DecodeError(RejectReason.SHAPE_MISMATCH, f"{where}: indices must increase strictly and stay in range")
        if not all_finite(value):
            raise DecodeError(RejectReason.NON_FINITE, f"{where}: contains NaN or Inf")
        return Sparse(shape, index, value).dense()
    raise DecodeError(RejectReason.BAD_FIELD, f"{where}: unknown tensor encoding {enc!r}")


__all__ = [
    "METHODS",
    "Quantized",
    "Sparse",
    "WireTensor",
    "compress",
    "decode_delta",
    "dense",
    "encode_wire",
]
