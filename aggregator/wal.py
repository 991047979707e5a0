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

Plain blocking file I/O, no asyncio: the service calls it from a worker thread; see
:class:`WriteAheadLog` for the pipelined group commit.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import struct
import threading
import zlib
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from fedmq.codec import pack, pack_pieces
from fedmq.errors import StateError
from fedmq.state import fsync_dir

log = logging.getLogger("fedmq.aggregator")

try:  # the same CRC-32 as zlib's, with SIMD: 0.15 ms for 4 MB against zlib's 0.9 ms here
    from zlib_ng.zlib_ng import crc32 as crc32
except ImportError:  # the device install has no need of it: the log is the aggregator's
    crc32 = zlib.crc32

FAST_CRC = crc32 is not zlib.crc32
_GIL_FREE_COPY = 64 * 1024
"""Whether the log's checksums use zlib-ng (``pip install 'fedmq[server]'``); the service says so at start."""
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
        if crc32(body) != crc:
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
                if crc32(data[pos : pos + 4]) != length_crc:
                    raise self._damage(pos, "the record length fails its CRC")
            start = pos + head.size
            if start + length > size:  # the body runs past the end: the tail of an interrupted append
                self.torn = size - pos
                return
            body = data[start : start + length]
            if crc32(body) != crc:
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


@dataclass
class Commit:
    """What :meth:`WriteAheadLog.seal` closed: records from ``start`` to ``end``, not yet on disk.

    Written and fsync'd by :meth:`WriteAheadLog.commit`, in a worker thread while new records
    are appended behind it.
    """

    start: int
    end: int
    chunks: list[mmap.mmap]
    tail: bytes
    """The bytes of the last, partial block (written through the page cache, not directly)."""
    lsn: int
    """The sequence number of the last record in it."""


class _Staging:
    """Page-aligned buffers the records of the next commit are copied into.

    Direct I/O (``O_DIRECT``) writes from these buffers without copying the data into the page
    cache: on this kind of machine (a VM, 2 cores) a buffered write of a 4 MB update costs 1
    to 6 ms of CPU to allocate cache pages, a direct one 0.5 ms (``benchmarks/ingest.py``).
    The buffers are reused: fresh memory costs page faults as well.
    """

    CHUNK = 8 * 1024 * 1024
    KEEP = 32
    """Spare chunks kept for reuse (256 MiB at most, held only once used): a group commit and the next one filling."""

    def __init__(self) -> None:
        self._spare: list[mmap.mmap] = []
        self._lock = threading.Lock()  # chunks come back from the committing thread

    def take(self) -> mmap.mmap:
        with self._lock:
            if self._spare:
                return self._spare.pop()
        return mmap.mmap(-1, self.CHUNK)

    def give_back(self, chunks: list[mmap.mmap]) -> None:
        with self._lock:
            for chunk in chunks:
                if len(self._spare) < self.KEEP:
                    self._spare.append(chunk)
                else:
                    chunk.close()

    def close(self) -> None:
        with self._lock:
            for chunk in self._spare:
                with contextlib.suppress(BufferError):  # still viewed somewhere: freed with the view
                    chunk.close()
            self._spare.clear()


class WriteAheadLog:
    """The log file of one generation, open for appending.

    Create a new generation with :meth:`create`; continue an existing one (after scanning it,
    which must have found no damage) with :meth:`resume`, which cuts a torn tail.

    Appending numbers a record and hands it to a thread of its own, which computes its CRC and
    copies it into page-aligned staging buffers: the caller (the event loop) goes on at once.
    :meth:`commit_async` closes the records appended so far into a :class:`Commit` (a group
    commit) and has a second thread write and fsync it; its future ends once they are on
    disk. Records appended meanwhile go into the next commit: the log is pipelined. Commits
    are written one at a time, in order. :meth:`sync` waits for everything appended.

    The whole blocks of a commit are written with ``O_DIRECT`` where the file system takes it
    (else through the page cache), its last partial block through the page cache; the next
    commit rewrites that block whole, starting with the same bytes, as PostgreSQL does with
    its last WAL page. The file's format does not depend on it.
    """

    BLOCK = 4096

    def __init__(self, path: Path, header: WalHeader, end: int, last_lsn: int) -> None:
        self.path = path
        self.header = header
        self.lsn = last_lsn
        """The sequence number of the last record written."""
        self._fd = os.open(path, os.O_WRONLY)
        self._direct_fd = -1
        if hasattr(os, "O_DIRECT"):
            try:
                self._direct_fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
            except OSError:  # a file system without direct I/O (tmpfs): everything goes through the cache
                self._direct_fd = -1
        self._staging = _Staging()
        self._stager = ThreadPoolExecutor(1, thread_name_prefix="fedmq-wal-stage")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="fedmq-wal-commit")
        self._broken: BaseException | None = None  # a staging error (our bug): raised at the next commit
        self.synced_offset = end
        """Everything before this offset is on disk (fsync'd)."""
        self.offset = end
        """Where the next record starts."""
        self.appended = 0
        self.syncs = 0
        # The open group: chunks holding [self._start, self.offset), the first starting with the
        # partial block the file ends in (re-read here, to be rewritten whole).
        self._start = end - end % self.BLOCK
        self._chunks: list[mmap.mmap] = []
        self._fill = 0  # bytes used in the last chunk
        self._sealed = end  # where the last sealed commit ends
        self._staged = end  # where the records staged so far end (the stager thread's view)
        self._staged_lsn = last_lsn
        if end > self._start:
            with open(path, "rb") as f:
                f.seek(self._start)
                self._copy(f.read(end - self._start))

    @property
    def generation(self) -> int:
        """This file's generation."""
        return self.header.generation

    @property
    def direct(self) -> bool:
        """Whether whole blocks bypass the page cache (``O_DIRECT``)."""
        return self._direct_fd >= 0

    @classmethod
    def create(cls, directory: Path, header: WalHeader) -> WriteAheadLog:
        """Start generation ``header.generation``: write its header, fsync the file and the folder."""
        path = wal_path(directory, header.generation)
        body = pack({"run": header.run, "generation": header.generation, "base_lsn": header.base_lsn})
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(fd, _FILE_HEADER.pack(MAGIC, FORMAT, len(body), crc32(body)) + body)
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
        """Append an accepted update, not yet fsync'd (durable after its commit); returns its size.

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
        pieces = pack_pieces(obj)  # the payload stays a view: copied once, into the staging buffer
        size = _RECORD_HEADER.size + sum(len(p) for p in pieces)
        self._stager.submit(self._stage, pieces, size, obj["lsn"])
        self.lsn += 1
        self.offset += size
        self.appended += 1
        return size

    def _stage(self, pieces: list[bytes | memoryview], size: int, lsn: int) -> None:
        """In the stager thread: CRC and copy one record."""
        try:
            crc = 0
            for piece in pieces:
                crc = crc32(piece, crc)
            length = _LEN.pack(size - _RECORD_HEADER.size)
            self._copy(length + _LEN.pack(crc32(length)) + _LEN.pack(crc))
            for piece in pieces:
                self._copy(piece)
            self._staged += size
            self._staged_lsn = lsn
        except BaseException as exc:  # kept, and raised where a caller waits
            self._broken = exc

    def _copy(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            if not self._chunks or self._fill == _Staging.CHUNK:
                self._chunks.append(self._staging.take())
                self._fill = 0
            n = min(len(view), _Staging.CHUNK - self._fill)
            if n >= _GIL_FREE_COPY:  # numpy copies without the GIL: the event loop runs on meanwhile
                np.frombuffer(self._chunks[-1], np.uint8, n, self._fill)[:] = np.frombuffer(view, np.uint8, n)
            else:
                self._chunks[-1][self._fill : self._fill + n] = view[:n]
            self._fill += n
            view = view[n:]

    @property
    def unsynced(self) -> int:
        """Bytes appended and not yet fsync'd (sealed or not)."""
        return self.offset - self.synced_offset

    def seal(self) -> Commit | None:
        """Close the records appended so far into a commit (``None`` if none); waits until they are staged."""
        return self._stager.submit(self._seal).result()

    def _seal(self) -> Commit | None:
        if self._broken is not None:
            raise RuntimeError("the write-ahead log could not stage a record") from self._broken
        end = self._staged
        if end == self._sealed:
            return None
        chunks, start = self._chunks, self._start
        whole = end - end % self.BLOCK
        tail = b""
        if end > whole:  # the partial last block: written buffered now, and begins the next group
            at = whole - start
            first = at % _Staging.CHUNK
            tail = bytes(chunks[at // _Staging.CHUNK][first : first + end - whole])
        self._chunks, self._fill, self._start = [], 0, whole
        self._sealed = end
        if tail:
            self._copy(tail)
        return Commit(start, end, chunks, tail, self._staged_lsn)

    def commit_async(self) -> Future[None]:
        """Seal what was appended so far and write and fsync it in the background.

        The future ends once it is on disk (at once if nothing was appended since the last
        commit), or with the ``OSError`` that kept it from the disk.
        """
        done: Future[None] = Future()

        def seal_and_pass() -> None:
            try:
                commit = self._seal()
            except BaseException as exc:  # handed to the waiter
                done.set_exception(exc)
                return
            if commit is None:
                done.set_result(None)
                return
            self._writer.submit(write, commit)

        def write(commit: Commit) -> None:
            try:
                self.commit(commit)
            except BaseException as exc:  # handed to the waiter
                done.set_exception(exc)
            else:
                done.set_result(None)

        self._stager.submit(seal_and_pass)
        return done

    def commit(self, commit: Commit) -> None:
        """Write a sealed commit and fsync it (blocking: call it from a worker thread).

        Commits are written one at a time, in the order they were sealed. On an ``OSError``
        nothing after :attr:`synced_offset` may be trusted: see :meth:`drop_unsynced`.
        """
        views: list[memoryview] = []
        try:
            whole = commit.end - commit.end % self.BLOCK
            if whole > commit.start:
                n, rest = divmod(whole - commit.start, _Staging.CHUNK)
                views = [memoryview(c) for c in commit.chunks[:n]]
                if rest:
                    views.append(memoryview(commit.chunks[n])[:rest])
                fd = self._direct_fd if self._direct_fd >= 0 else self._fd
                _pwrite_all(fd, list(views), commit.start)
            if commit.tail:
                _pwrite_all(self._fd, [memoryview(commit.tail)], whole)
            os.fdatasync(self._fd)
        finally:
            for view in views:  # an error's traceback keeps this frame: no view may pin a chunk
                view.release()
            views.clear()
            self._staging.give_back(commit.chunks)
        self.synced_offset = max(self.synced_offset, commit.end)
        self.syncs += 1

    def sync(self) -> None:
        """Make everything appended so far survive a crash (blocking)."""
        self.commit_async().result()

    def drop_unsynced(self) -> None:
        """Forget what was written since the last sync (a failed write or fsync): cut the file there.

        The caller rebuilds its state from what is on disk; this object is closed.
        """
        try:
            self.close()
        finally:
            os.truncate(self.path, self.synced_offset)

    def close(self) -> None:
        """Close the file (call :meth:`sync` first for what must survive); waits for its threads."""
        self._stager.shutdown(wait=True)
        self._writer.shutdown(wait=True)
        self._staging.give_back(self._chunks)
        self._chunks = []
        self._staging.close()
        for fd in (self._fd, self._direct_fd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._direct_fd = -1


def _pwrite_all(fd: int, views: list[memoryview], offset: int) -> None:
    """``pwritev`` until every byte is written (a short write continues where it stopped)."""
    while views:
        n = os.pwritev(fd, views, offset)
        offset += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views = views[1:]
        if n:
            views = [views[0][n:], *views[1:]]


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
