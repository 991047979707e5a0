"""Durable state files (checkpoints, accountant state): checksummed msgpack, written atomically.

A file is a fixed header and a msgpack body::

    the 8 bytes "FEDMQST" 0x02 | body length (u64 le) | SHA-256 of the body (32 bytes) | body

The body is ``{"schema", "kind", "state"}``; arrays in ``state`` are ``{"$tensor": <wire
tensor>}``, read back through the same validating decoder as network input; nothing is ever
unpickled. The digest is checked before anything is decoded, so a flipped bit anywhere (a
weight's exponent, a counter) is a named :class:`~fedmq.errors.StateError`, not a model that
loads and is quietly wrong.

Writes go to a temporary file in the same folder (mode 0600), are fsync'd, then renamed over
the target, so a crash leaves either the old or the new file, never a torn one.

Files written before the checksum (a bare msgpack map) are still read, with a warning, so
that a device's privacy accountant survives the upgrade; the next save adds the checksum.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from fedmq import SCHEMA_VERSION
from fedmq.codec import DecodeLimits, decode_tensor, encode_tensor, pack, unpack
from fedmq.errors import DecodeError, StateError

log = logging.getLogger("fedmq.state")
MAGIC = b"FEDMQST\x02"
_HEADER = struct.Struct("<8sQ32s")

_TAG = "$tensor"
STATE_LIMITS = DecodeLimits(max_payload_bytes=2 * 1024 * 1024 * 1024, max_array_len=10_000_000, max_map_len=10_000_000)


def _to_wire(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return {_TAG: encode_tensor(obj)}
    if isinstance(obj, dict):
        return {str(k): _to_wire(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_wire(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _from_wire(obj: Any, where: str) -> Any:
    if isinstance(obj, dict):
        if len(obj) == 1 and _TAG in obj:
            return np.array(decode_tensor(obj[_TAG], where=where, limits=STATE_LIMITS))
        return {k: _from_wire(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_wire(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    return obj


def write_atomic(path: str | os.PathLike[str], data: bytes, *, mode: int | None = None, gid: int | None = None) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new one, never a torn one.

    A temporary file in the same folder (created 0600; ``mode`` and group ``gid`` are applied
    before any byte is written) is fsync'd, renamed over ``path``, and the folder fsync'd.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        if gid is not None:
            os.fchown(fd, -1, gid)
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Fsync a folder, so that a file created, renamed or deleted in it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def encode_state(kind: str, state: dict[str, Any]) -> bytes:
    """The bytes of a state file: header with the body's length and SHA-256, then the body."""
    body = pack({"schema": SCHEMA_VERSION, "kind": kind, "state": _to_wire(state)})
    return _HEADER.pack(MAGIC, len(body), hashlib.sha256(body).digest()) + body


def write_state(path: str | os.PathLike[str], kind: str, state: dict[str, Any]) -> int:
    """Atomically write ``state`` (plain values and numpy arrays) to ``path``; return its size."""
    data = encode_state(kind, state)
    write_atomic(path, data, mode=0o600)
    return len(data)


def read_state(path: str | os.PathLike[str], kind: str) -> dict[str, Any] | None:
    """Read a state file written by :func:`write_state`; ``None`` if there is none.

    Raises:
        StateError: the file exists but is damaged (checksum, length) or is not a ``kind``
            state file; it names the path.
    """
    path = Path(path)
    try:
        payload = path.read_bytes()
    except FileNotFoundError:
        return None
    return decode_state(payload, kind, str(path))


def decode_state(payload: bytes, kind: str, where: str) -> dict[str, Any]:
    """Verify and decode the bytes of a state file (``where`` names it in errors)."""
    if payload[: len(MAGIC)] == MAGIC:
        if len(payload) < _HEADER.size:
            raise StateError(where, f"truncated: {len(payload)} bytes, the header alone is {_HEADER.size}")
        _, length, digest = _HEADER.unpack_from(payload)
        body = memoryview(payload)[_HEADER.size :]
        if length != len(body):
            raise StateError(where, f"damaged: the header says {length} bytes of state, the file has {len(body)}")
        if hashlib.sha256(body).digest() != digest:
            raise StateError(where, "damaged: SHA-256 of the contents does not match the one written with them")
    elif payload[:1] and 0x80 <= payload[0] <= 0x8F:  # a bare msgpack map: written before checksums
        log.warning("%s has no checksum (written by an older fedmq); it gets one when it is next saved", where)
        body = memoryview(payload)
    else:
        raise StateError(where, f"not a fedmq state file (it starts with {bytes(payload[:8])!r})")
    try:
        obj = unpack(body, STATE_LIMITS)
        if obj.get("schema") != SCHEMA_VERSION or obj.get("kind") != kind:
            raise ValueError(f"schema {obj.get('schema')!r}, kind {obj.get('kind')!r}, expected kind {kind!r}")
        state = _from_wire(obj["state"], "state")
    except (DecodeError, ValueError, KeyError) as exc:
        raise StateError(where, f"not a valid {kind} file: {exc}") from None
    if not isinstance(state, dict):
        raise StateError(where, f"not a valid {kind} file")
    return state
