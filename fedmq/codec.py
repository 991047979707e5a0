"""The msgpack tensor codec: named tensors and messages to bytes and back, without pickle.

A tensor is a msgpack map ``{"dtype": str, "shape": [int, ...], "data": bin}`` where
``data`` is the array's little-endian bytes in C order. There are no msgpack extension
types and no pickle, so any msgpack library in any language can read a message.

Encoding packs straight from a ``memoryview`` of the array (no intermediate
``tobytes()`` copy). Decoding enforces size limits *before* allocation (msgpack's own
``max_*_len`` limits), checks dtype, shape against the byte length, and finiteness, and
returns read-only ``numpy`` views of the decoded ``bin`` fields: msgpack copies each tensor's
bytes once while parsing, and nothing copies them again.
"""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import numpy.typing as npt

from fedmq.errors import DecodeError, RejectReason

Tensors = dict[str, npt.NDArray[Any]]
"""Named tensors: the unit that models, updates and checkpoints exchange."""

DTYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(name).newbyteorder("<")
    for name in ("float16", "float32", "float64", "int8", "uint8", "int16", "int32", "int64")
}
"""Wire dtype names and their little-endian numpy dtypes. Nothing else is accepted."""

_FLOAT_NAMES = frozenset({"float16", "float32", "float64"})


@dataclass(frozen=True)
class DecodeLimits:
    """Upper bounds the decoder enforces on untrusted input.

    The defaults admit a 16M-parameter float32 model (64 MiB); lower them on small devices.
    """

    max_payload_bytes: int = 64 * 1024 * 1024
    max_tensors: int = 1024
    max_ndim: int = 8
    max_str_len: int = 4096
    max_array_len: int = 100_000
    max_map_len: int = 4096


DEFAULT_LIMITS = DecodeLimits()


def encode_tensor(array: npt.NDArray[Any]) -> dict[str, Any]:
    """Return the wire map of one tensor; the ``data`` field is a view, not a copy.

    Arrays that are not C-contiguous or not little-endian are converted first (one copy).
    """
    name = array.dtype.name
    if name not in DTYPES:
        raise TypeError(f"dtype {array.dtype} cannot be sent; use one of {sorted(DTYPES)}")
    # np.require keeps 0-d arrays 0-d (np.ascontiguousarray would make them 1-d).
    arr = np.require(array, dtype=DTYPES[name], requirements="C")
    flat: Any = arr.reshape(-1)  # numpy arrays implement the buffer protocol
    return {"dtype": name, "shape": list(arr.shape), "data": memoryview(flat).cast("B")}


def encode_tensors(tensors: Mapping[str, npt.NDArray[Any]]) -> dict[str, dict[str, Any]]:
    """Encode named tensors (see :func:`encode_tensor`)."""
    return {str(k): encode_tensor(v) for k, v in tensors.items()}


def decode_tensor(
    obj: Any, *, where: str, limits: DecodeLimits = DEFAULT_LIMITS, require_finite: bool = True
) -> npt.NDArray[Any]:
    """Validate one wire tensor and return a read-only view of its bytes.

    Raises:
        DecodeError: with reason ``bad_dtype``, ``shape_mismatch``, ``bad_field`` or ``non_finite``.
    """
    if not isinstance(obj, dict) or set(obj) != {"dtype", "shape", "data"}:
        raise DecodeError(RejectReason.BAD_FIELD, f"{where}: a tensor is a map of exactly dtype, shape, data")
    dtype_name, shape, data = obj["dtype"], obj["shape"], obj["data"]
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise DecodeError(RejectReason.BAD_DTYPE, f"{where}: dtype {dtype_name!r} is not one of {sorted(DTYPES)}")
    if not isinstance(shape, list) or len(shape) > limits.max_ndim or not all(type(d) is int and d >= 0 for d in shape):
        raise DecodeError(
            RejectReason.SHAPE_MISMATCH, f"{where}: shape must be a list of at most {limits.max_ndim} non-negative ints"
        )
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError(RejectReason.BAD_FIELD, f"{where}: data must be msgpack bin")
    dtype = DTYPES[dtype_name]
    expected = math.prod(shape) * dtype.itemsize
    if expected != len(data):
        raise DecodeError(
            RejectReason.SHAPE_MISMATCH,
            f"{where}: shape {shape} of {dtype_name} needs {expected} bytes, got {len(data)}",
        )
    arr = np.frombuffer(data, dtype=dtype).reshape(shape)
    if sys.byteorder == "big":  # pragma: no cover - no big-endian CI machine
        arr = arr.astype(dtype.newbyteorder("="))
    if require_finite and dtype_name in _FLOAT_NAMES and not np.isfinite(arr).all():
        raise DecodeError(RejectReason.NON_FINITE, f"{where}: contains NaN or Inf")
    return arr


def decode_tensors(
    obj: Any, *, where: str, limits: DecodeLimits = DEFAULT_LIMITS, require_finite: bool = True
) -> Tensors:
    """Decode a map of named wire tensors."""
    if not isinstance(obj, dict):
        raise DecodeError(RejectReason.BAD_FIELD, f"{where}: must be a map of named tensors")
    if len(obj) > limits.max_tensors:
        raise DecodeError(RejectReason.TOO_LARGE, f"{where}: {len(obj)} tensors, limit {limits.max_tensors}")
    out: Tensors = {}
    for name, t in obj.items():
        if not isinstance(name, str):
            raise DecodeError(RejectReason.BAD_FIELD, f"{where}: tensor names must be strings")
        out[name] = decode_tensor(t, where=f"{where}[{name!r}]", limits=limits, require_finite=require_finite)
    return out


def _refuse_ext(code: int, data: bytes) -> Any:
    raise DecodeError(RejectReason.MALFORMED, f"msgpack extension type {code} is not allowed")


_LARGE_BIN = 4096
"""Buffers at least this big are not copied into msgpack's own buffer first (see :func:`pack`)."""


def pack(message: Mapping[str, Any]) -> bytes:
    """Serialize a message map to msgpack bytes (``bin`` for bytes, ``str`` for text).

    The bytes are exactly ``msgpack.packb(message, use_bin_type=True)``, but large buffers
    (tensor data, as memoryviews) are copied once, straight into the result: maps are written
    piece by piece and the pieces joined, instead of msgpack packing everything into its own
    buffer and then copying that buffer into a ``bytes`` object.
    """
    pieces: list[bytes | memoryview] = []
    _emit(message, pieces)
    return b"".join(pieces)


_local = threading.local()


def _packer() -> msgpack.Packer:
    """A msgpack Packer per thread (agents encode in worker threads; creating one per call is slow)."""
    packer: msgpack.Packer | None = getattr(_local, "packer", None)
    if packer is None:
        packer = _local.packer = msgpack.Packer(use_bin_type=True)
    return packer


def _has_large(obj: Any) -> bool:
    if isinstance(obj, memoryview):
        return obj.nbytes >= _LARGE_BIN
    if isinstance(obj, Mapping):
        return any(_has_large(v) for v in obj.values())
    return False


def _emit(obj: Any, pieces: list[bytes | memoryview]) -> None:
    packer = _packer()
    if isinstance(obj, Mapping) and _has_large(obj):
        pieces.append(_map_header(len(obj)))
        for key, value in obj.items():
            pieces.append(packer.pack(key))
            _emit(value, pieces)
    elif isinstance(obj, memoryview) and obj.nbytes >= _LARGE_BIN:
        flat = obj.cast("B") if obj.format != "B" or obj.ndim != 1 else obj
        pieces.append(_bin_header(flat.nbytes))
        pieces.append(flat)
    else:
        pieces.append(packer.pack(obj))


def _map_header(n: int) -> bytes:
    if n < 16:
        return bytes([0x80 | n])
    if n < 1 << 16:
        return b"\xde" + n.to_bytes(2, "big")
    return b"\xdf" + n.to_bytes(4, "big")


def _bin_header(n: int) -> bytes:
    if n < 1 << 8:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 1 << 16:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


def unpack(payload: bytes | bytearray | memoryview, limits: DecodeLimits = DEFAULT_LIMITS) -> dict[str, Any]:
    """Parse untrusted msgpack bytes into a map under ``limits``.

    Raises:
        DecodeError: ``too_large`` before parsing when the payload exceeds the limit,
            ``malformed`` for truncated/invalid/nested-too-deep msgpack or extension types.
    """
    size = len(payload)
    if size > limits.max_payload_bytes:
        raise DecodeError(RejectReason.TOO_LARGE, f"payload of {size} bytes, limit {limits.max_payload_bytes}")
    try:
        obj = msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            ext_hook=_refuse_ext,
            max_bin_len=limits.max_payload_bytes,
            max_str_len=limits.max_str_len,
            max_array_len=limits.max_array_len,
            max_map_len=limits.max_map_len,
            max_ext_len=0,
        )
    except DecodeError:
        raise
    except (
        ValueError,
        TypeError,
        msgpack.ExtraData,
        msgpack.FormatError,
        msgpack.StackError,
        msgpack.OutOfData,
        UnicodeDecodeError,
        RecursionError,
    ) as exc:
        raise DecodeError(RejectReason.MALFORMED, f"invalid msgpack: {type(exc).__name__}: {exc}"[:300]) from None
    if not isinstance(obj, dict):
        raise DecodeError(RejectReason.MALFORMED, f"top level must be a map, got {type(obj).__name__}")
    return obj
