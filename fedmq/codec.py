"""The msgpack tensor codec: named tensors and messages to bytes and back, without pickle.

A tensor is a msgpack map ``{"dtype": str, "shape": [int, ...], "data": bin}`` where
``data`` is the array's little-endian bytes in C order. There are no msgpack extension
types and no pickle, so any msgpack library in any language can read a message.

Encoding packs straight from a ``memoryview`` of the array: each tensor's bytes are copied
once, into the message. Decoding copies nothing: :func:`unpack` is a strict, bounds-checked
msgpack reader that returns ``bin`` fields as views of the payload, enforces size limits
*before* slicing, and the tensor decoder checks dtype, shape against the byte length and
finiteness, and returns read-only ``numpy`` views of the received bytes.
"""

from __future__ import annotations

import math
import struct
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

_WIRE_NAME: dict[np.dtype[Any], str] = {dt: name for name, dt in DTYPES.items()}
"""Little-endian dtypes to wire names (a dict lookup is faster than ``dtype.name``)."""

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
    name = _WIRE_NAME.get(array.dtype)
    if name is None:
        name = array.dtype.name
        if name not in DTYPES:
            raise TypeError(f"dtype {array.dtype} cannot be sent; use one of {sorted(DTYPES)}")
    arr = array
    if not (array.flags.c_contiguous and array.dtype == DTYPES[name]):
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
    dtype_name = obj["dtype"]
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise DecodeError(RejectReason.BAD_DTYPE, f"{where}: dtype {dtype_name!r} is not one of {sorted(DTYPES)}")
    shape = wire_shape(obj, where=where, limits=limits)
    data = wire_bin(obj, "data", where=where)
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
    if require_finite and dtype_name in _FLOAT_NAMES and not all_finite(arr):
        raise DecodeError(RejectReason.NON_FINITE, f"{where}: contains NaN or Inf")
    return arr


def wire_shape(obj: Mapping[str, Any], *, where: str, limits: DecodeLimits = DEFAULT_LIMITS) -> list[int]:
    """The ``shape`` field of a wire tensor (plain or compressed), checked.

    Raises:
        DecodeError: ``shape_mismatch`` unless it is a list of at most ``max_ndim`` ints >= 0.
    """
    shape = obj.get("shape")
    if not isinstance(shape, list) or len(shape) > limits.max_ndim or not all(type(d) is int and d >= 0 for d in shape):
        raise DecodeError(
            RejectReason.SHAPE_MISMATCH, f"{where}: shape must be a list of at most {limits.max_ndim} non-negative ints"
        )
    return shape


def wire_bin(obj: Mapping[str, Any], key: str, *, where: str) -> memoryview:
    """A ``bin`` field of a wire tensor, as a memoryview (no copy).

    Raises:
        DecodeError: ``bad_field`` if it is not msgpack bin.
    """
    data = obj.get(key)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError(RejectReason.BAD_FIELD, f"{where}: {key} must be msgpack bin")
    return memoryview(data)


def all_finite(arr: npt.NDArray[np.floating[Any]]) -> bool:
    """True when no element is NaN or +-Inf, in one pass without a temporary array.

    ``x . x`` is a sum of squares, each >= 0 or NaN, so it is finite only if every element is;
    a finite array can still overflow it (values beyond ~1e19 in float32), and only then is
    the exact element-wise check run.
    """
    flat = arr.reshape(-1)
    if flat.size >= 65536 and flat.dtype in _BLAS_FLOATS:  # below that, a temporary is cheaper than errstate
        with np.errstate(over="ignore", invalid="ignore"):
            if np.isfinite(np.dot(flat, flat)):
                return True
    return bool(np.isfinite(flat).all())


_BLAS_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def owner_nbytes(arr: npt.NDArray[Any]) -> int:
    """Bytes of the buffer that finally owns ``arr``'s memory: what keeping ``arr`` keeps alive.

    A decoded tensor is a view into its message (:func:`unpack` copies nothing), so holding it
    holds the whole payload.
    """
    obj: Any = arr
    while True:
        if isinstance(obj, np.ndarray) and obj.base is not None:
            obj = obj.base
        elif isinstance(obj, memoryview):
            obj = obj.obj
        elif isinstance(obj, np.ndarray):
            return int(obj.nbytes)
        else:
            try:
                return len(memoryview(obj).cast("B"))
            except TypeError:  # pragma: no cover - numpy bases are arrays or buffers
                return int(arr.nbytes)


def detached(tensors: Mapping[str, npt.NDArray[Any]], *, slack: float = 2.0) -> Tensors:
    """``tensors``, copying those whose owning buffer is more than ``slack`` times their own bytes.

    For whoever keeps decoded tensors beyond one message (a FedBuff buffer): the tensors of
    one update normally share their payload, which is barely larger than they are together,
    and stay views; a payload padded with anything else is not kept alive by them.
    """
    shared: dict[int, int] = {}
    owners: dict[str, tuple[int, int]] = {}
    for name, arr in tensors.items():
        base: Any = arr
        while isinstance(base, np.ndarray) and base.base is not None:
            base = base.base
        key = id(base.obj if isinstance(base, memoryview) else base)
        shared[key] = shared.get(key, 0) + int(arr.nbytes)
        owners[name] = (key, owner_nbytes(arr))
    out: Tensors = {}
    for name, arr in tensors.items():
        key, size = owners[name]
        out[name] = np.array(arr) if size > slack * shared[key] + 4096 else arr
    return out


def decode_tensors(
    obj: Any, *, where: str, limits: DecodeLimits = DEFAULT_LIMITS, require_finite: bool = True
) -> Tensors:
    """Decode a map of named wire tensors."""
    return {
        name: decode_tensor(t, where=at, limits=limits, require_finite=require_finite)
        for name, t, at in named_items(obj, where=where, limits=limits)
    }


def named_items(obj: Any, *, where: str, limits: DecodeLimits = DEFAULT_LIMITS) -> list[tuple[str, Any, str]]:
    """Check a map of named wire tensors: a map, not too many, string names.

    Returns ``(name, wire tensor, where)`` for each, the wire tensors not yet decoded.
    """
    if not isinstance(obj, dict):
        raise DecodeError(RejectReason.BAD_FIELD, f"{where}: must be a map of named tensors")
    if len(obj) > limits.max_tensors:
        raise DecodeError(RejectReason.TOO_LARGE, f"{where}: {len(obj)} tensors, limit {limits.max_tensors}")
    out = []
    for name, t in obj.items():
        if not isinstance(name, str):
            raise DecodeError(RejectReason.BAD_FIELD, f"{where}: tensor names must be strings")
        out.append((name, t, f"{where}[{name!r}]"))
    return out


_LARGE_BIN = 4096
"""Buffers at least this big are not copied into msgpack's own buffer first (see :func:`pack`)."""

ALIGN = 8
"""Large tensors' data starts at a multiple of this offset in the message (see :func:`pack`)."""


def pack(message: Mapping[str, Any]) -> bytes:
    """Serialize a message map to msgpack bytes (``bin`` for bytes, ``str`` for text).

    Large buffers (tensor data, as memoryviews) are copied once, straight into the result:
    maps are written piece by piece and the pieces joined, instead of msgpack packing
    everything into its own buffer and then copying that buffer into a ``bytes`` object.

    The data of each large tensor starts at an offset that is a multiple of :data:`ALIGN`,
    so that the decoder's zero-copy views are aligned (numpy runs unaligned float arrays
    through slow paths: ``x . x`` is 65x slower on this machine). The padding is msgpack's own
    freedom of encoding: a shape's first dimension and up to four of the tensor map's short
    strings are written in a wider format than the shortest (``0xcd 0x00 0x05`` for ``5``,
    ``str8`` for a ``fixstr``). Every msgpack reader decodes the same values; apart from those
    widened fields the bytes are exactly ``msgpack.packb(message, use_bin_type=True)``.
    """
    return b"".join(pack_pieces(message))


def pack_pieces(message: Mapping[str, Any]) -> list[bytes | memoryview]:
    """The pieces :func:`pack` joins, in order: large buffers are views of the caller's memory.

    For a writer that copies them once into a buffer of its own (the aggregator's log).
    """
    writer = _Writer()
    writer.emit(message)
    return writer.pieces


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


_TENSOR_KEYS = ("dtype", "shape", "data")


class _Writer:
    """Collects the pieces of one message and the offset they reach."""

    __slots__ = ("offset", "packer", "pieces")

    def __init__(self) -> None:
        self.pieces: list[bytes | memoryview] = []
        self.offset = 0
        self.packer = _packer()

    def put(self, piece: bytes | memoryview) -> None:
        self.pieces.append(piece)
        self.offset += len(piece)

    def emit(self, obj: Any) -> None:
        if isinstance(obj, dict) and len(obj) == 3 and tuple(obj) == _TENSOR_KEYS:
            data = obj["data"]
            if isinstance(data, memoryview) and data.nbytes >= _LARGE_BIN and self._aligned_tensor(obj):
                return
        if isinstance(obj, Mapping) and _has_large(obj):
            self.put(_map_header(len(obj)))
            for key, value in obj.items():
                self.put(self.packer.pack(key))
                self.emit(value)
        elif isinstance(obj, memoryview) and obj.nbytes >= _LARGE_BIN:
            self._bin(obj)
        else:
            self.put(self.packer.pack(obj))

    def _bin(self, data: memoryview) -> None:
        flat = data.cast("B") if data.format != "B" or data.ndim != 1 else data
        self.put(_bin_header(flat.nbytes))
        self.put(flat)

    def _aligned_tensor(self, obj: Mapping[str, Any]) -> bool:
        """Write a tensor map whose data lands on an ALIGN boundary; False if it is not one."""
        dtype, shape, data = obj["dtype"], obj["shape"], obj["data"]
        if not (isinstance(dtype, str) and len(dtype) < 32 and isinstance(shape, list) and 0 < len(shape) < 16):
            return False
        if not all(type(d) is int and 0 <= d < 1 << 64 for d in shape) or not isinstance(data, memoryview):
            return False
        nbytes = data.nbytes
        strings = ["dtype", dtype, "shape", "data"]
        minimal = 1 + sum(1 + len(x) for x in strings) + 1 + sum(_uint_width(d) for d in shape)
        minimal += len(_bin_header(nbytes))
        pad = -(self.offset + minimal) % ALIGN
        first = _uint_width(shape[0])
        for width in _UINT_WIDTHS:
            if width >= first and (pad - (width - first)) % ALIGN <= len(strings):
                wide = (pad - (width - first)) % ALIGN
                break
        else:  # pragma: no cover - every pad in 0..7 has a plan (see the tests)
            return False
        enc = [_str_wide(x) if i < wide else self.packer.pack(x) for i, x in enumerate(strings)]
        dims = _uint(shape[0], width) + b"".join(_uint(d, _uint_width(d)) for d in shape[1:])
        self.put(b"\x83" + enc[0] + enc[1] + enc[2] + bytes([0x90 | len(shape)]) + dims + enc[3])
        self._bin(data)
        return True


_UINT_WIDTHS = (1, 2, 3, 5, 9)
_UINT_CODES = {2: (0xCC, 1), 3: (0xCD, 2), 5: (0xCE, 4), 9: (0xCF, 8)}


def _uint_width(n: int) -> int:
    """Bytes of the shortest msgpack encoding of a non-negative int."""
    return 1 if n < 0x80 else 2 if n < 1 << 8 else 3 if n < 1 << 16 else 5 if n < 1 << 32 else 9


def _uint(n: int, width: int) -> bytes:
    """A non-negative int in the msgpack format of ``width`` bytes (not necessarily the shortest)."""
    if width == 1:
        return bytes([n])
    code, size = _UINT_CODES[width]
    return bytes([code]) + n.to_bytes(size, "big")


def _str_wide(text: str) -> bytes:
    """A short string as ``str8`` rather than ``fixstr``: one byte longer, the same value."""
    raw = text.encode()
    return b"\xd9" + bytes([len(raw)]) + raw


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
    """Parse untrusted msgpack bytes into a map under ``limits``, without copying ``bin`` fields.

    Every ``bin`` comes back as a read-only ``memoryview`` into ``payload`` (which it keeps
    alive), so tensors decode as views of the received message: zero copies. The parser is
    a strict reader of the msgpack spec for the types fedmq messages use (all of them except
    extension types): every declared length is checked against the bytes that remain and
    against ``limits`` before anything is sliced, nesting is capped at :data:`MAX_DEPTH`,
    map keys must be strings and unique, and trailing bytes are an error.

    Raises:
        DecodeError: ``too_large`` before parsing when the payload exceeds the limit,
            ``malformed`` for truncated/invalid/nested-too-deep msgpack or extension types.
    """
    size = len(payload)
    if size > limits.max_payload_bytes:
        raise DecodeError(RejectReason.TOO_LARGE, f"payload of {size} bytes, limit {limits.max_payload_bytes}")
    view = memoryview(payload)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    view = view.toreadonly()
    try:
        obj, end = _Reader(view, limits).read(0, 0)
        if end != size:
            raise _Malformed(f"{size - end} extra bytes after the message")
    except _Malformed as exc:
        raise DecodeError(RejectReason.MALFORMED, f"invalid msgpack: {exc}"[:300]) from None
    except UnicodeDecodeError as exc:
        raise DecodeError(RejectReason.MALFORMED, f"invalid msgpack: bad UTF-8 in a str: {exc}"[:300]) from None
    if not isinstance(obj, dict):
        raise DecodeError(RejectReason.MALFORMED, f"top level must be a map, got {type(obj).__name__}")
    return obj


MAX_DEPTH = 32
"""Deepest nesting of maps and arrays the decoder accepts (fedmq messages use 4)."""


class _Malformed(Exception):
    """Internal: the bytes are not valid msgpack (turned into ``DecodeError(MALFORMED)``)."""


_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_I8 = struct.Struct(">b")
_I16 = struct.Struct(">h")
_I32 = struct.Struct(">i")
_I64 = struct.Struct(">q")
_F32 = struct.Struct(">f")
_F64 = struct.Struct(">d")
_FIXED: dict[int, tuple[struct.Struct, int]] = {
    0xCA: (_F32, 4),
    0xCB: (_F64, 8),
    0xCC: (struct.Struct(">B"), 1),
    0xCD: (_U16, 2),
    0xCE: (_U32, 4),
    0xCF: (_U64, 8),
    0xD0: (_I8, 1),
    0xD1: (_I16, 2),
    0xD2: (_I32, 4),
    0xD3: (_I64, 8),
}
_LEN: dict[int, tuple[str, struct.Struct | None, int]] = {
    # first byte -> (kind, length field, length field size)
    0xC4: ("bin", None, 1),
    0xC5: ("bin", _U16, 2),
    0xC6: ("bin", _U32, 4),
    0xD9: ("str", None, 1),
    0xDA: ("str", _U16, 2),
    0xDB: ("str", _U32, 4),
    0xDC: ("array", _U16, 2),
    0xDD: ("array", _U32, 4),
    0xDE: ("map", _U16, 2),
    0xDF: ("map", _U32, 4),
}


class _Reader:
    """A bounds-checked msgpack reader over one ``memoryview``; see :func:`unpack`."""

    __slots__ = ("buf", "end", "limits")

    def __init__(self, buf: memoryview, limits: DecodeLimits) -> None:
        self.buf = buf
        self.end = len(buf)
        self.limits = limits

    def _need(self, pos: int, n: int) -> None:
        if pos + n > self.end:
            raise _Malformed(f"truncated: {n} bytes needed at offset {pos}, {self.end - pos} left")

    def read(self, pos: int, depth: int) -> tuple[Any, int]:
        """Return the object starting at ``pos`` and the offset just after it."""
        if pos >= self.end:
            raise _Malformed(f"truncated: object expected at offset {pos}")
        b = self.buf[pos]
        pos += 1
        if b <= 0x7F:
            return b, pos
        if b >= 0xE0:
            return b - 0x100, pos
        if 0xA0 <= b <= 0xBF:
            return self._str(pos, b & 0x1F)
        if 0x80 <= b <= 0x8F:
            return self._map(pos, b & 0x0F, depth)
        if 0x90 <= b <= 0x9F:
            return self._array(pos, b & 0x0F, depth)
        if b == 0xC0:
            return None, pos
        if b == 0xC2:
            return False, pos
        if b == 0xC3:
            return True, pos
        fixed = _FIXED.get(b)
        if fixed is not None:
            st, n = fixed
            self._need(pos, n)
            return st.unpack_from(self.buf, pos)[0], pos + n
        spec = _LEN.get(b)
        if spec is None:
            if 0xC7 <= b <= 0xC9 or 0xD4 <= b <= 0xD8:
                raise _Malformed(f"msgpack extension type (0x{b:02x}) at offset {pos - 1} is not allowed")
            raise _Malformed(f"invalid msgpack type byte 0x{b:02x} at offset {pos - 1}")
        kind, field, n = spec
        self._need(pos, n)
        length = self.buf[pos] if field is None else field.unpack_from(self.buf, pos)[0]
        pos += n
        if kind == "bin":
            if length > self.limits.max_payload_bytes:
                raise _Malformed(f"bin of {length} bytes over the limit")
            self._need(pos, length)
            return self.buf[pos : pos + length], pos + length
        if kind == "str":
            return self._str(pos, length)
        if kind == "array":
            return self._array(pos, length, depth)
        return self._map(pos, length, depth)

    def _str(self, pos: int, n: int) -> tuple[str, int]:
        if n > self.limits.max_str_len:
            raise _Malformed(f"str of {n} bytes, limit {self.limits.max_str_len}")
        self._need(pos, n)
        return str(self.buf[pos : pos + n], "utf-8"), pos + n

    def _array(self, pos: int, n: int, depth: int) -> tuple[list[Any], int]:
        if n > self.limits.max_array_len:
            raise _Malformed(f"array of {n} items, limit {self.limits.max_array_len}")
        if depth >= MAX_DEPTH:
            raise _Malformed(f"nested deeper than {MAX_DEPTH}")
        self._need(pos, n)  # every item takes at least one byte: refuse lies before allocating
        out: list[Any] = []
        for _ in range(n):
            item, pos = self.read(pos, depth + 1)
            out.append(item)
        return out, pos

    def _map(self, pos: int, n: int, depth: int) -> tuple[dict[str, Any], int]:
        if n > self.limits.max_map_len:
            raise _Malformed(f"map of {n} entries, limit {self.limits.max_map_len}")
        if depth >= MAX_DEPTH:
            raise _Malformed(f"nested deeper than {MAX_DEPTH}")
        self._need(pos, 2 * n)
        buf, end = self.buf, self.end
        out: dict[str, Any] = {}
        for _ in range(n):
            b = buf[pos] if pos < end else 0xC1
            if 0xA0 <= b <= 0xBF and pos + 1 + (b & 0x1F) <= end and (b & 0x1F) <= self.limits.max_str_len:
                # a fixstr key, the common case: inline
                key: Any = str(buf[pos + 1 : pos + 1 + (b & 0x1F)], "utf-8")
                pos += 1 + (b & 0x1F)
            else:
                key, pos = self.read(pos, depth + 1)
                if not isinstance(key, str):
                    raise _Malformed(f"map keys must be str, got {type(key).__name__}")
            if key in out:  # msgpack itself keeps the last value: a second claim must not override a checked one
                raise _Malformed(f"map key {key[:64]!r} appears twice")
            b = buf[pos] if pos < end else 0xC1
            if b <= 0x7F:  # positive fixint value, inline
                out[key] = b
                pos += 1
            else:
                out[key], pos = self.read(pos, depth + 1)
        return out, pos
