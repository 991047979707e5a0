"""Durable state files (checkpoints, accountant state): tagged msgpack, written atomically.

Arrays are stored as ``{"$tensor": <wire tensor>}`` and read back through the same
validating decoder as network input; nothing is ever unpickled. Writes go to a temporary
file in the same folder, are fsync'd, then renamed over the target, so a crash leaves
either the old or the new file, never a torn one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from fedmq import SCHEMA_VERSION
from fedmq.codec import DecodeLimits, decode_tensor, encode_tensor, pack, unpack
from fedmq.errors import DecodeError

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


def write_state(path: str | os.PathLike[str], kind: str, state: dict[str, Any]) -> None:
    """Atomically write ``state`` (plain values and numpy arrays) to ``path``."""
    write_atomic(path, pack({"schema": SCHEMA_VERSION, "kind": kind, "state": _to_wire(state)}))


def read_state(path: str | os.PathLike[str], kind: str) -> dict[str, Any] | None:
    """Read a state file written by :func:`write_state`; ``None`` if there is none.

    Raises:
        ValueError: the file exists but is not a valid ``kind`` state file (names the path).
    """
    path = Path(path)
    try:
        payload = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        obj = unpack(payload, STATE_LIMITS)
        if obj.get("schema") != SCHEMA_VERSION or obj.get("kind") != kind:
            raise ValueError(f"schema {obj.get('schema')!r}, kind {obj.get('kind')!r}")
        state = _from_wire(obj["state"], "state")
    except (DecodeError, ValueError, KeyError) as exc:
        raise ValueError(f"{path} is not a valid {kind} file: {exc}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a valid {kind} file")
    return state
