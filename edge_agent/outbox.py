"""The agent's outbox: every released update until the aggregator's receipt for it arrives.

An update is written here (atomically, fsync'd) before its first publish and removed only
when a receipt (accepted or rejected) names its ``seq``. After a reconnect or a restart of
the agent, everything still here is published again; the aggregator answers a re-send of an
update it already accepted with the same receipt, so nothing is applied twice.

With no directory the outbox lives in memory (it then survives reconnects, not restarts).
It holds at most ``max_items`` updates: when it is full the agent stops training until a
receipt frees a place (a device cut off for hours does not fill its disk).

An entry found on disk that no longer passes ``validate`` (damaged, or written by a build that
spoke another schema) is moved to ``quarantine/`` and counted, never re-sent: the aggregator
could not even answer it, so it would hold a slot for good.

Plain blocking file I/O, no asyncio: the service calls it from a worker thread or for
small files directly.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from fedmq.state import fsync_dir, write_atomic

log = logging.getLogger("fedmq.agent")
SUFFIX = ".update"


class Outbox:
    """Pending updates by sequence number, optionally persisted in ``directory``."""

    def __init__(
        self, directory: Path | None, max_items: int = 16, *, validate: Callable[[bytes], str | None] | None = None
    ) -> None:
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items}")
        self.directory = Path(directory) if directory is not None else None
        self.max_items = max_items
        self.quarantined = 0
        """Entries set aside because they no longer decode."""
        self._items: dict[int, bytes] = {}
        self._lock = threading.Lock()  # the trainer's worker thread puts, the event loop reads and removes
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            for p in sorted(self.directory.glob(f"*{SUFFIX}")):
                stem = p.name[: -len(SUFFIX)]
                if not stem.isdigit():
                    continue
                payload = p.read_bytes()
                problem = validate(payload) if validate is not None else None
                if problem is not None:
                    self._quarantine(p, problem)
                    continue
                self._items[int(stem)] = payload
            for p in self.directory.glob(f".*{SUFFIX}.*"):  # a crash mid-write: never published
                p.unlink(missing_ok=True)
            if self._items:
                log.info("outbox %s: %d updates from before the restart", self.directory, len(self._items))

    def _quarantine(self, path: Path, problem: str) -> None:
        assert self.directory is not None
        target = self.directory / "quarantine"
        target.mkdir(exist_ok=True)
        os.replace(path, target / path.name)
        fsync_dir(self.directory)
        self.quarantined += 1
        log.warning("outbox entry %s does not decode (%s): moved to %s, not sent", path.name, problem, target)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, seq: object) -> bool:
        return seq in self._items

    @property
    def full(self) -> bool:
        """No room for another update until a receipt arrives."""
        return len(self._items) >= self.max_items

    def put(self, seq: int, payload: bytes) -> None:
        """Keep ``payload`` (durably, with a directory) until :meth:`remove` is called for ``seq``."""
        if self.directory is not None:
            write_atomic(self.directory / f"{seq:020d}{SUFFIX}", payload)
        with self._lock:
            self._items[seq] = payload

    def remove(self, seq: int) -> bool:
        """Forget ``seq`` (its receipt arrived); False if it was not here."""
        with self._lock:
            if self._items.pop(seq, None) is None:
                return False
        if self.directory is not None:
            (self.directory / f"{seq:020d}{SUFFIX}").unlink(missing_ok=True)
        return True

    def get(self, seq: int) -> bytes | None:
        """The payload kept for ``seq``, if any."""
        with self._lock:
            return self._items.get(seq)

    def pending(self) -> list[tuple[int, bytes]]:
        """``(seq, payload)`` of every update without a receipt, oldest first."""
        with self._lock:
            return sorted(self._items.items())
