"""Write-ahead log of the aggregator core's inputs since its last checkpoint.

Crash recovery is "checkpoint + replay": a checkpoint holds the core's state at some moment
and the log sequence number it had reached (``base_lsn``); every input accepted afterwards
is appended to the log, numbered ``base_lsn + 1, + 2, ...``, before anything is said about it,
and on start the records after the checkpoint's number are fed back through the same
deterministic core.

File ``wal.<generation>`` (mode 0600)::

    header   b"FEDMQWAL" | format u32 = 2 | length u32 | crc32 u32 | msgpack {run, generation, base_lsn}
    record   length u32 | crc32 of the 4 length bytes u32 | crc32 of the body u32 | body

all little-endian. A body is a msgpack map: ``{"t": "u", "lsn", "agent", "payload", "now",
"index"}`` for an accepted update (the bytes exactly as received; ``index`` its place in the
order of application) or ``{"t": "e", "lsn", "event", "now"}`` for a core event that changed
state without an update (a sync round opened or closed).

Damage is told apart from a torn tail:

- a **torn tail** is an incomplete last record (fewer bytes left than a record header, or a
  header whose length CRC holds and whose body runs past the end of the file): what a crash
  in the middle of an append leaves. It was never fsync'd, so never acknowledged, and it is
  cut off when the log is opened for appending;
- anything else (a length whose CRC fails, a complete body whose CRC fails, a body that does
  not decode, a sequence number that does not follow the previous one) is **corruption**:
  :class:`~fedmq.errors.StateError` names the file and the offset of the record, and the file
  is left exactly as it is.

Files written before this format (records ``length | crc32 | body`` with no header) are read
for an upgrade, with no index to check.

Plain blocking file I/O, no asyncio: the service calls it from a worker thread.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from fedmq.codec import pack
from fedmq.errors import StateError
from fedmq.state import fsync_dir

log = logging.getLogger("fedmq.aggregator")
MAGIC = b"FEDMQWAL"
FORMAT = 2
_FILE_HEADER = struct.Struct("<8sIII")
_RECORD_HEADER = struct.Struct("<III")
_LEN = struct.Struct("<I")
_LEGACY_HEADER = struct.Struct("<II")
MAX_RECORD = 1 << 31


@dataclass(frozen=True)
class WalHeader:
    """What a log file says about itself."""

    run: str
    generation: int
    base_lsn: int
    """The log sequence number the checkpoint of this generation had reached (records continue from it)."""


@dataclass(frozen=True)
class WalRecord:
    """One logged input: an accepted update (``kind == "update"``) or a core event."""

    kind: str
    offset: int
    """Where the record starts in its file."""
    lsn: int | None
    """Its log sequence number (``None`` in files of the older format)."""
    now: float | None
    agent: str = ""
    payload: bytes = b""
    index: int | None = None
    event: Mapping[str, Any] | None = None
    deferred: bool = False
    """An update the core held for the next FedBuff buffer when it was accepted."""


def wal_path(directory: Path, generation: int) -> Path:
    """``directory/wal.<generation>``."""
    return Path(directory) / f"wal.{generation}"


class WalScan:
    """Reads one log file, record by record, and tells how it ends.

    Iterate :meth:`records` to the end; afterwards :attr:`end` is the offset after the last
    intact record and :attr:`torn` the bytes of an incomplete last record (0 if none). A
    damaged record raises :class:`StateError` during the iteration.
    """

    def __init__(self, path: Path, *, legacy: bool = False) -> None:
        """Read ``path``; ``legacy`` accepts a file of the older format (an upgrade), else it is damage."""
        self.path = Path(path)
        self.data = self.path.read_bytes()
        self.header: WalHeader | None = None
        starts = self.data[: len(MAGIC)]
        self.legacy = legacy and len(self.data) > 0 and starts != MAGIC
        if not self.legacy and starts != MAGIC[: len(starts)]:
            raise self._damage(0, f"the file does not start with {MAGIC!r}")
        self.end = 0
        self.torn = 0
        self._start = 0 if self.legacy else self._read_header()
        self.last_lsn = self.header.base_lsn if self.header else 0
        """The sequence number of the last intact record read (the header's base before any)."""

    def _damage(self, offset: int, problem: str) -> StateError:
        return StateError(
            str(self.path),
            f"damaged write-ahead log record ({problem}); later records are not read",
            offset=offset,
            hint="the file is left as it is; `fedmq recover` shows the options",
        )

    def _read_header(self) -> int:
        data = self.data
        if len(data) < _FILE_HEADER.size:
            # A crash while the file was being created: no record can follow an incomplete header.
            self.torn = len(data)
            return len(data)
        _, fmt, length, crc = _FILE_HEADER.unpack_from(data)
        if fmt != FORMAT:
            raise StateError(str(self.path), f"log format {fmt}, this fedmq writes {FORMAT}", offset=0)
        body = data[_FILE_HEADER.size : _FILE_HEADER.size + length]
        if len(body) < length:
            self.torn = len(data)
            return len(data)
        if zlib.crc32(body) != crc:
            raise self._damage(0, "the file header fails its CRC")
        try:
            h = msgpack.unpackb(body, raw=False)
            self.header = WalHeader(str(h["run"]), int(h["generation"]), int(h["base_lsn"]))
        except (ValueError, KeyError, TypeError, msgpack.ExtraData) as exc:
            raise self._damage(0, f"the file header does not decode: {exc}") from None
        self.end = _FILE_HEADER.size + length
        return self.end

    def records(self) -> Iterator[WalRecord]:
        """Every intact record in order; stops at a torn tail, raises at damage."""
        data, pos, size = self.data, self._start, len(self.data)
        if self.torn:
            return
        head = _LEGACY_HEADER if self.legacy else _RECORD_HEADER
        while pos < size:
            if size - pos < head.size:
                self.torn = size - pos
                return
            if self.legacy:
                length, crc = _LEGACY_HEADER.unpack_from(data, pos)
                if length > MAX_RECORD:
                    raise self._damage(pos, f"length {length} is impossible")
            else:
                length, length_crc, crc = _RECORD_HEADER.unpack_from(data, pos)
                if zlib.crc32(data[pos : pos + 4]) != length_crc:
                    raise self._damage(pos, "the record length fails its CRC")
            start = pos + head.size
            if start + length > size:  # the body runs past the end: the tail of an interrupted append
                self.torn = size - pos
                return
            body = data[start : start + length]
            if zlib.crc32(body) != crc:
                raise self._damage(pos, "the record body fails its CRC")
            record = self._decode(body, pos)
            if record.lsn is not None:
                if record.lsn != self.last_lsn + 1:
                    raise self._damage(pos, f"sequence number {record.lsn} does not follow {self.last_lsn}")
                self.last_lsn = record.lsn
            pos = start + length
            self.end = pos
            yield record

    def _decode(self, body: bytes, offset: int) -> WalRecord:
        try:
            rec = msgpack.unpackb(body, raw=False)
            if self.legacy:
                return WalRecord("update", offset, None, None, str(rec["agent"]), bytes(rec["payload"]))
            lsn, now = int(rec["lsn"]), float(rec["now"])
            if rec["t"] == "u":
                return WalRecord(
                    "update",
                    offset,
                    lsn,
                    now,
                    str(rec["agent"]),
                    bytes(rec["payload"]),
                    int(rec["index"]),
                    deferred=rec.get("deferred") is True,
                )
            if rec["t"] == "e" and isinstance(rec["event"], dict):
                return WalRecord("event", offset, lsn, now, event=rec["event"])
            raise ValueError(f"record type {rec['t']!r}")
        except (ValueError, KeyError, TypeError, msgpack.ExtraData) as exc:
            raise self._damage(offset, f"the body does not decode: {exc}") from None


class WriteAheadLog:
    """The log file of one generation, open for appending.

    Create a new generation with :meth:`create`; continue an existing one (after scanning it,
    which must have found no damage) with :meth:`resume`, which cuts a torn tail.
    """

    def __init__(self, path: Path, header: WalHeader, end: int, last_lsn: int) -> None:
        self.path = path
        self.header = header
        self.lsn = last_lsn
        """The sequence number of the last record written."""
        self._file = open(path, "r+b")  # noqa: SIM115 - owned by this object, closed in close()
        self._file.seek(end)
        self.synced_offset = end
        """Everything before this offset is on disk (fsync'd)."""
        self.offset = end
        self.appended = 0
        self.syncs = 0

    @property
    def generation(self) -> int:
        """This file's generation."""
        return self.header.generation

    @classmethod
    def create(cls, directory: Path, header: WalHeader) -> WriteAheadLog:
        """Start generation ``header.generation``: write its header, fsync the file and the folder."""
        path = wal_path(directory, header.generation)
        body = pack({"run": header.run, "generation": header.generation, "base_lsn": header.base_lsn})
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(fd, _FILE_HEADER.pack(MAGIC, FORMAT, len(body), zlib.crc32(body)) + body)
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(directory)
        return cls(path, header, _FILE_HEADER.size + len(body), header.base_lsn)

    @classmethod
    def resume(cls, scan: WalScan) -> WriteAheadLog:
        """Append to a scanned file of the current format, cutting its torn tail (if any) first."""
        assert scan.header is not None, "only a current-format log is appended to"
        assert not scan.legacy, "only a current-format log is appended to"
        if scan.torn:
            log.warning(
                "%s: cutting an incomplete last record of %d bytes at offset %d", scan.path, scan.torn, scan.end
            )
            os.truncate(scan.path, scan.end)
            fd = os.open(scan.path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return cls(scan.path, scan.header, scan.end, scan.last_lsn)

    def write_update(self, agent: str, payload: bytes, *, now: float, index: int, deferred: bool = False) -> int:
        """Append an accepted update, not yet fsync'd (durable after the next :meth:`sync`); returns its size.

        ``deferred``: the core held it for the next buffer (the decision a replay must repeat).
        """
        obj = {"t": "u", "agent": agent, "payload": memoryview(payload), "now": now, "index": index}
        if deferred:
            obj["deferred"] = True
        return self._append(obj)

    def write_event(self, event: Mapping[str, Any], *, now: float) -> int:
        """Append a core event (not yet fsync'd); returns its size."""
        return self._append({"t": "e", "event": dict(event), "now": now})

    def _append(self, obj: dict[str, Any]) -> int:
        obj["lsn"] = self.lsn + 1
        body = pack(obj)  # the payload is copied once, into the record
        length = _LEN.pack(len(body))
        head = length + _LEN.pack(zlib.crc32(length)) + _LEN.pack(zlib.crc32(body))
        self._file.write(head)
        self._file.write(body)
        self.lsn += 1
        self.offset += len(head) + len(body)
        self.appended += 1
        return len(head) + len(body)

    @property
    def unsynced(self) -> int:
        """Bytes written since the last :meth:`sync`."""
        return self.offset - self.synced_offset

    def sync(self) -> None:
        """Make everything written so far survive a crash."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self.synced_offset = self.offset
        self.syncs += 1

    def drop_unsynced(self) -> None:
        """Forget what was written since the last sync (a failed write or fsync): cut the file there.

        The caller rebuilds its state from what is on disk; this object is closed.
        """
        try:
            self._file.close()
        finally:
            os.truncate(self.path, self.synced_offset)

    def close(self) -> None:
        """Close the file (call :meth:`sync` first for what must survive)."""
        self._file.close()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
