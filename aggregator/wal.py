"""Write-ahead log of accepted updates: what the aggregator has applied since its last checkpoint.

Crash recovery is "checkpoint + replay": the checkpoint holds the core's state at some
moment and the number of the WAL *generation* that starts there; every update accepted
afterwards is appended (and fsync'd) to that generation's file before anything is said about
it. On start, the aggregator loads the checkpoint and feeds the generation's records back
through the same deterministic core, which restores model version, rule buffer, dedupe state
and counters exactly as they were at the last durable append.

File format: ``wal.<generation>`` holds records ``len (u32 le) | crc32 (u32 le) | body``,
``body`` a msgpack map ``{"agent": str, "payload": bin}`` (the update exactly as received).
A torn tail (a crash mid-append) fails its length or CRC check; it is cut off on open, as
it was never acknowledged.

Plain blocking file I/O, no asyncio: the service calls it from a worker thread.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import msgpack

from fedmq.codec import pack
from fedmq.state import fsync_dir

log = logging.getLogger("fedmq.aggregator")
_HEADER = struct.Struct("<II")
MAX_RECORD = 1 << 31


class WriteAheadLog:
    """Append-only, fsync'd log of one generation in ``directory``."""

    def __init__(self, directory: Path, generation: int) -> None:
        if generation < 0:
            raise ValueError(f"generation must be >= 0, got {generation}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.generation = generation
        self.path = self._path(generation)
        valid_end = self._scan_end()
        self._file = open(self.path, "ab")  # noqa: SIM115 - owned by this object, closed in close()
        if self._file.tell() != valid_end:
            log.warning("%s: cutting a torn tail at byte %d (a crash mid-append)", self.path, valid_end)
            self._file.truncate(valid_end)
            self._fsync()
        self.appended = 0
        self.syncs = 0

    def _path(self, generation: int) -> Path:
        return self.directory / f"wal.{generation}"

    def _scan_end(self) -> int:
        end = 0
        for offset, _agent, _payload in self._iter_records():
            end = offset
        return end

    def _iter_records(self) -> Iterator[tuple[int, str, bytes]]:
        """``(offset after the record, agent, payload)`` for every intact record, in order."""
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            offset = 0
            while True:
                head = f.read(_HEADER.size)
                if len(head) < _HEADER.size:
                    return
                length, crc = _HEADER.unpack(head)
                if length > MAX_RECORD:
                    return
                body = f.read(length)
                if len(body) < length or zlib.crc32(body) != crc:
                    return
                try:
                    rec = msgpack.unpackb(body, raw=False)
                    agent, payload = str(rec["agent"]), bytes(rec["payload"])
                except (ValueError, KeyError, TypeError, msgpack.ExtraData):
                    return
                offset += _HEADER.size + length
                yield offset, agent, payload

    def records(self) -> Iterator[tuple[str, bytes]]:
        """``(agent, payload)`` of every durable record of this generation, oldest first."""
        for _end, agent, payload in self._iter_records():
            yield agent, payload

    def append(self, agent: str, payload: bytes) -> None:
        """Append one accepted update and fsync: when this returns, it survives a crash."""
        self.write(agent, payload)
        self.sync()

    def write(self, agent: str, payload: bytes) -> None:
        """Append one accepted update without fsync: durable only after the next :meth:`sync`.

        Group commit: one fsync covers every update written since the last.
        """
        body = pack({"agent": agent, "payload": memoryview(payload)})  # the payload is copied once
        self._file.write(_HEADER.pack(len(body), zlib.crc32(body)))
        self._file.write(body)
        self.appended += 1

    def sync(self) -> None:
        """Make everything written so far survive a crash."""
        self._fsync()
        self.syncs += 1

    def _fsync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def rotate(self, generation: int) -> None:
        """Start ``generation`` (a checkpoint now covers everything before it); delete older files."""
        if generation <= self.generation:
            raise ValueError(f"generation {generation} is not after {self.generation}")
        self._file.close()
        self.generation = generation
        self.path = self._path(generation)
        self._file = open(self.path, "ab")  # noqa: SIM115
        self.appended = 0
        self.prune()
        fsync_dir(self.directory)

    def prune(self) -> None:
        """Delete the files of generations before the current one."""
        for p in self.directory.glob("wal.*"):
            suffix = p.name.split(".", 1)[1]
            if suffix.isdigit() and int(suffix) < self.generation:
                p.unlink(missing_ok=True)

    def close(self) -> None:
        """Close the file (everything appended is already durable)."""
        self._file.close()
