"""The aggregator's state folder: checkpoints, write-ahead logs and the run marker.

Layout of ``aggregator.checkpoint_dir``::

    fedmq-state.json    the marker: a run keeps its state here (written when the run begins)
    checkpoint.<G>      the core's state when log generation G began (checksummed, fedmq.state)
    wal.<G>             every input the core accepted since (aggregator.wal)
    damaged/            files that ``fedmq recover`` set aside: evidence, never deleted
    discarded-<time>/   an earlier run's files, moved aside by ``--fresh``

Two generations are kept: the newest checkpoint with its log, and the one before with its
log, so that a damaged newest checkpoint can be rebuilt exactly from the previous one
(``fedmq recover --rebuild``).

**The checkpoint step** (:meth:`StateStore.checkpoint`, one blocking call that the service
runs shielded from cancellation) moves from generation G to G+1:

1. fsync ``wal.G`` (everything acknowledged is on disk);
2. write ``checkpoint.G+1`` atomically (temporary file, fsync, rename, fsync the folder);
3. create ``wal.G+1`` with its header (run, G+1, the last log sequence number), fsync it and
   the folder, and append there from now on;
4. delete generation G-1 and older.

A crash between any two steps leaves a state that :meth:`StateStore.open` recognises and
resumes: after 2, ``checkpoint.G+1`` exists without its log and ``wal.G`` is complete (the
log is started, and any record in ``wal.G`` beyond the checkpoint is replayed, never
deleted); after 3 or during 4, older files are pruned. ``tests/test_store_model.py`` crashes
at every step against a model of these states.

**At start** everything else is refused with a :class:`~fedmq.errors.StateError` naming the
file: a checkpoint or a log that fails its checksum or CRC (offset included), a checkpoint or
log that went missing while the marker says state was kept here, a log newer than every
checkpoint, headers of another run, gaps in the log's sequence numbers. Nothing is deleted or
truncated at start except temporary files and the incomplete last record of the newest log
(a torn tail: never acknowledged). ``fedmq recover`` shows what it found and decides, on the
operator's word, what to keep.

Plain blocking file I/O, no asyncio.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from aggregator.wal import WalHeader, WalRecord, WalScan, WriteAheadLog, wal_path
from fedmq.errors import StateError
from fedmq.state import fsync_dir, read_state, write_atomic, write_state

log = logging.getLogger("fedmq.aggregator")
CHECKPOINT_KIND = "aggregator-checkpoint"
MARKER = "fedmq-state.json"
LEGACY_CHECKPOINT = "aggregator.ckpt"
DAMAGED = "damaged"
Mode = Literal["start", "rebuild", "accept-loss"]


def new_run_id() -> str:
    """A fresh federation run id (128 random bits, hex)."""
    return secrets.token_hex(16)


def checkpoint_path(directory: Path, generation: int) -> Path:
    """``directory/checkpoint.<generation>``."""
    return Path(directory) / f"checkpoint.{generation}"


def latest_checkpoint(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The newest checkpoint's state in ``directory`` (None if there is none); for audits and tools."""
    ckpts, _ = StateStore(directory)._generations()
    return read_state(ckpts[max(ckpts)], CHECKPOINT_KIND) if ckpts else None


@dataclass
class Restored:
    """What :meth:`StateStore.open` found: where to resume from and what to replay."""

    run: str
    checkpoint: dict[str, Any] | None
    """The core's state (``None``: no checkpoint yet, start from the initial model)."""
    base_lsn: int
    """The log sequence number the checkpoint covers (0 without one)."""
    generation: int
    """The generation appends continue in."""
    sources: list[WalScan] = field(default_factory=list)
    """Logs whose records after ``base_lsn`` are to be replayed, oldest first."""
    notes: list[str] = field(default_factory=list)
    """What was found and resumed (crash points, torn tails), for the log."""
    new_run: bool = False
    """A run began here now (fresh folder, ``--fresh``, or a rollback the operator confirmed)."""
    checkpoint_now: bool = False
    """Checkpoint as soon as the replay is done: the state came from older files (a rebuild, a
    recovery, an older fedmq, or records of the previous generation) that a next start would
    not read again."""

    def records(self) -> Iterator[tuple[WalScan, WalRecord]]:
        """The records to replay, with the file each comes from (for error messages)."""
        for scan in self.sources:
            for record in scan.records():
                if record.lsn is None or record.lsn > self.base_lsn:
                    if scan.header is None or scan.header.generation != self.generation:
                        self.checkpoint_now = True
                    yield scan, record


class StateStore:
    """One state folder. :meth:`open` it, replay what it returns, then :meth:`begin_appending`."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.wal: WriteAheadLog | None = None
        self.run = ""
        self._dry = False

    # --- opening -------------------------------------------------------------------------------
    def open(self, *, fresh: bool = False, mode: Mode = "start", dry_run: bool = False) -> Restored:
        """Find the state to resume from; raise :class:`StateError` for anything not resumable.

        ``fresh`` moves an existing state aside and begins a new run. ``mode`` is ``start`` for
        a normal start; ``rebuild`` and ``accept-loss`` are the choices of ``fedmq recover``.
        ``dry_run`` (a normal start only) finds the same but creates, moves and deletes nothing.
        """
        self._dry = dry_run
        if dry_run:
            assert mode == "start", "a dry run only looks"
            assert not fresh, "a dry run only looks"
        else:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._remove_temporary_files()
        ckpts, wals = self._generations()
        marked = (self.directory / MARKER).exists()
        legacy = (self.directory / LEGACY_CHECKPOINT).exists() or any(_is_legacy(p) for p in wals.values())
        if fresh:
            if ckpts or wals or marked or legacy:
                moved = self._set_aside(f"discarded-{_stamp()}")
                note = f"--fresh: the previous state was moved to {moved}; a new run begins"
                log.warning("%s: %s", self.directory, note)
                return self._begin_run([note])
            return self._begin_run([])
        if legacy and not marked:
            return self._open_legacy(wals)
        if not marked:
            if ckpts or wals:
                raise StateError(
                    str(self.directory / MARKER),
                    f"missing, but checkpoints {sorted(ckpts)} and logs {sorted(wals)} are here",
                    hint="the folder was copied incompletely; `fedmq recover` shows what is here",
                )
            return self._begin_run([])
        self._read_marker()
        if mode == "accept-loss":
            return self._open_accepting_loss(ckpts, wals)
        return self._open(ckpts, wals, rebuild=mode == "rebuild")

    def _open(self, ckpts: dict[int, Path], wals: dict[int, Path], *, rebuild: bool) -> Restored:
        if not ckpts:
            if not wals:
                raise StateError(
                    str(self.directory / MARKER),
                    "a run kept its state here, but there is no checkpoint and no write-ahead log (missing)",
                    hint="restore the files; or start a new run with --fresh (the model and its history are lost)",
                )
            if max(wals) > 0:
                raise StateError(
                    str(checkpoint_path(self.directory, max(wals))),
                    f"missing: wal.{max(wals)} exists, so this checkpoint was written once",
                    hint="restore it, or `fedmq recover --accept-loss` (a rollback)",
                )
            scan = self._scan(wals[0], run=None, base_lsn=0, generation=0)
            self.run = scan.header.run if scan.header else new_run_id()
            return Restored(self.run, None, 0, 0, [scan])
        newest = max(ckpts)
        try:
            state = self._read_checkpoint(ckpts[newest], newest)
            newer = [g for g in wals if g > newest]
            if newer:
                raise StateError(
                    str(checkpoint_path(self.directory, max(newer))),
                    f"missing: wal.{max(newer)} is newer than the newest checkpoint (checkpoint.{newest})",
                    hint=f"`fedmq recover --rebuild` replays it from checkpoint.{newest}",
                )
        except StateError as exc:
            if rebuild:
                return self._rebuild(ckpts, wals, exc)
            if exc.hint is None and newest - 1 in ckpts:
                exc = StateError(
                    exc.path,
                    exc.problem,
                    offset=exc.offset,
                    hint="`fedmq recover --rebuild` rebuilds it exactly from the previous checkpoint and logs",
                )
            raise exc from None
        return self._continue_from(state, newest, wals)

    def _continue_from(self, state: dict[str, Any], gen: int, wals: dict[int, Path]) -> Restored:
        self.run = str(state["run"])
        base = int(state["base_lsn"])
        restored = Restored(self.run, state, base, gen)
        if gen in wals:
            restored.sources.append(self._scan(wals[gen], run=self.run, base_lsn=base, generation=gen))
            if gen - 1 in wals:
                self._check_previous(wals[gen - 1])
            return restored
        if gen - 1 in wals:
            # Crash point: the checkpoint was written, its log not yet started. Records the old
            # log holds beyond the checkpoint (there are none unless a step was split) are replayed.
            restored.sources.append(self._scan(wals[gen - 1], run=self.run, base_lsn=None, generation=gen - 1))
            restored.notes.append(f"checkpoint.{gen} was written but wal.{gen} not started (a crash there): resumed")
            return restored
        raise StateError(
            str(wal_path(self.directory, gen)),
            f"missing: checkpoint.{gen} was written, so this log existed",
            hint="restore it; or `fedmq recover --accept-loss` keeps the checkpoint (updates logged after it are lost)",
        )

    def _rebuild(self, ckpts: dict[int, Path], wals: dict[int, Path], why: StateError) -> Restored:
        """From the newest intact checkpoint and every log after it: exact if those logs are intact."""
        for gen in sorted(ckpts, reverse=True):
            try:
                state = self._read_checkpoint(ckpts[gen], gen)
            except StateError:
                continue
            chain = [g for g in sorted(wals) if g >= gen]
            if not chain or chain != list(range(gen, max(chain) + 1)):
                continue
            self.run = str(state["run"])
            base = int(state["base_lsn"])
            restored = Restored(self.run, state, base, max(chain), checkpoint_now=True)
            for g in chain:
                restored.sources.append(
                    self._scan(wals[g], run=self.run, base_lsn=base if g == gen else None, generation=g)
                )
            for bad in [g for g in ckpts if g > gen]:
                self._move_to_damaged(ckpts[bad])
            restored.notes.append(f"rebuilt from checkpoint.{gen} and logs {chain} ({why})")
            return restored
        raise StateError(why.path, why.problem, offset=why.offset, hint="no intact earlier checkpoint to rebuild from")

    def _open_accepting_loss(self, ckpts: dict[int, Path], wals: dict[int, Path]) -> Restored:
        """The newest consistent state that can be had; whatever is beyond it is lost (a rollback).

        A new run begins (agents follow it and drop updates trained on the old one); files set
        aside go to ``damaged/``.
        """
        notes: list[str] = []
        state: dict[str, Any] | None = None
        gen = 0
        for g in sorted(ckpts, reverse=True):
            try:
                state = self._read_checkpoint(ckpts[g], g)
                gen = g
                break
            except StateError as exc:
                notes.append(f"checkpoint.{g} unusable ({exc.problem}): set aside")
                self._move_to_damaged(ckpts[g])
        base = int(state["base_lsn"]) if state is not None else 0
        old_run = str(state["run"]) if state is not None else None
        self.run = new_run_id()
        restored = Restored(self.run, state, base, gen, notes=notes, new_run=True, checkpoint_now=True)
        expected = gen
        for g in sorted(wals):
            if g < gen:
                continue
            if g != expected:
                notes.append(f"wal.{g} does not follow the kept state: set aside")
                self._move_to_damaged(wals[g])
                continue
            try:
                scan = self._scan(wals[g], run=old_run, base_lsn=base if g == gen else None, generation=g)
                for _ in scan.records():
                    pass
            except StateError as exc:
                if exc.offset is None or exc.offset == 0:
                    notes.append(f"wal.{g} unusable ({exc.problem}): set aside")
                    self._move_to_damaged(wals[g])
                    break
                notes.append(f"wal.{g} damaged at offset {exc.offset}: kept up to there, the whole file set aside too")
                self._keep_prefix(wals[g], exc.offset)
            scan = WalScan(wals[g])
            restored.sources.append(scan)
            expected = g + 1
        if state is None and not restored.sources:
            notes.append("nothing usable: the new run starts from the initial model")
        log.warning("%s: accepting loss: %s; new run %s", self.directory, "; ".join(notes) or "nothing lost", self.run)
        return restored

    def _open_legacy(self, wals: dict[int, Path]) -> Restored:
        state = read_state(self.directory / LEGACY_CHECKPOINT, CHECKPOINT_KIND)
        gen = int(state.get("wal_generation", 0)) if state else 0
        self.run = new_run_id()
        restored = Restored(self.run, state, 0, gen, new_run=True, checkpoint_now=True)
        if gen in wals:
            restored.sources.append(WalScan(wals[gen], legacy=True))
        restored.notes.append(f"the state of an older fedmq ({LEGACY_CHECKPOINT}, wal.{gen}) is migrated")
        if not self._dry:
            self._write_marker()
        return restored

    def _begin_run(self, notes: list[str]) -> Restored:
        self.run = new_run_id()
        if not self._dry:
            self._write_marker()
            self.wal = WriteAheadLog.create(self.directory, WalHeader(self.run, 0, 0))
        return Restored(self.run, None, 0, 0, notes=notes, new_run=True)

    def begin_appending(self, restored: Restored) -> None:
        """After the replay: append to the current generation (resumed, or created) and prune old files."""
        if self.wal is None:
            current = [s for s in restored.sources if s.header and s.header.generation == restored.generation]
            if current:
                # Also when a recovery begins a new run: the checkpoint that follows at once
                # starts the new run's generation, and a crash before it leaves the old run's
                # state intact (the header still names the old run, as its checkpoint does).
                self.wal = WriteAheadLog.resume(current[0])
            else:
                lsn = max([restored.base_lsn] + [s.last_lsn for s in restored.sources if s.header])
                path = wal_path(self.directory, restored.generation)
                if path.exists():
                    if any(s.legacy and s.path == path for s in restored.sources):
                        os.replace(path, path.with_name(f"{path.name}.before-migration"))  # kept, not deleted
                    else:
                        path.unlink()  # a header torn when the file was created: no record was ever in it
                self.wal = WriteAheadLog.create(self.directory, WalHeader(self.run, restored.generation, lsn))
        self._prune(self.wal.generation)

    # --- writing --------------------------------------------------------------------------------
    def checkpoint(self, state: dict[str, Any]) -> int:
        """The checkpoint step (see the module docstring); returns the checkpoint's size in bytes.

        ``state`` must cover every record written so far (the caller holds the core still).
        """
        wal = self._wal
        wal.sync()
        gen = wal.generation + 1
        size = write_state(
            checkpoint_path(self.directory, gen),
            CHECKPOINT_KIND,
            {**state, "run": self.run, "generation": gen, "base_lsn": wal.lsn},
        )
        self.wal = WriteAheadLog.create(self.directory, WalHeader(self.run, gen, wal.lsn))
        wal.close()
        self._prune(gen)
        if (self.directory / LEGACY_CHECKPOINT).exists():
            (self.directory / LEGACY_CHECKPOINT).unlink()
            fsync_dir(self.directory)
        return size

    @property
    def _wal(self) -> WriteAheadLog:
        assert self.wal is not None, "begin_appending() has not run"
        return self.wal

    def close(self) -> None:
        """Close the log (what was synced is durable)."""
        if self.wal is not None:
            self.wal.close()
            self.wal = None

    # --- inspection (fedmq recover) ---------------------------------------------------------------
    def inventory(self) -> list[str]:
        """One line per state file: name, size, and what it says about itself."""
        lines = []
        ckpts, wals = self._generations()
        lines.append(f"{MARKER}: " + ("present" if (self.directory / MARKER).exists() else "absent"))
        for g, p in sorted(ckpts.items()):
            try:
                s = self._read_checkpoint(p, g)
                lines.append(
                    f"{p.name}: {p.stat().st_size} bytes, run {s['run']}, version {s.get('version')}, "
                    f"covers log records to {s['base_lsn']}"
                )
            except StateError as exc:
                lines.append(f"{p.name}: {p.stat().st_size} bytes, DAMAGED: {exc.problem}")
        for _, p in sorted(wals.items()):
            try:
                scan = WalScan(p)  # (a damaged header raises here already)
                n = sum(1 for _ in scan.records())
                head = scan.header
                what = f"run {head.run}, records {head.base_lsn + 1}-{scan.last_lsn}" if head else "older format"
                tail = f", an incomplete last record of {scan.torn} bytes" if scan.torn else ""
                lines.append(f"{p.name}: {p.stat().st_size} bytes, {what} ({n}){tail}")
            except StateError as exc:
                lines.append(f"{p.name}: {p.stat().st_size} bytes, DAMAGED at offset {exc.offset}: {exc.problem}")
        return lines

    # --- helpers -------------------------------------------------------------------------------
    def _generations(self) -> tuple[dict[int, Path], dict[int, Path]]:
        ckpts: dict[int, Path] = {}
        wals: dict[int, Path] = {}
        for p in self.directory.iterdir() if self.directory.exists() else ():
            stem, _, suffix = p.name.partition(".")
            if suffix.isdigit() and p.is_file():
                if stem == "checkpoint":
                    ckpts[int(suffix)] = p
                elif stem == "wal":
                    wals[int(suffix)] = p
        return ckpts, wals

    def _read_checkpoint(self, path: Path, gen: int) -> dict[str, Any]:
        state = read_state(path, CHECKPOINT_KIND)
        if state is None:
            raise StateError(str(path), "missing")
        if state.get("generation") != gen or not isinstance(state.get("run"), str) or "base_lsn" not in state:
            raise StateError(str(path), f"says it is generation {state.get('generation')!r}, not {gen}")
        return state

    def _scan(self, path: Path, *, run: str | None, base_lsn: int | None, generation: int) -> WalScan:
        scan = WalScan(path)
        head = scan.header
        if head is None:  # the older format, or a crash while the file was being created
            return scan
        if (run is not None and head.run != run) or head.generation != generation:
            raise StateError(
                str(path),
                f"header says run {head.run} generation {head.generation}, expected run {run} generation "
                f"{generation} (files of two runs mixed?)",
                offset=0,
            )
        if base_lsn is not None and head.base_lsn != base_lsn:
            raise StateError(
                str(path), f"starts after log record {head.base_lsn}, its checkpoint covers {base_lsn}", offset=0
            )
        return scan

    def _check_previous(self, path: Path) -> None:
        """The previous generation is not needed for the current state, only to rebuild a damaged checkpoint."""
        try:
            for _ in WalScan(path).records():
                pass
        except StateError as exc:
            log.warning(
                "%s: the previous generation's log (kept to rebuild a damaged checkpoint) is damaged at "
                "offset %s; the current state is intact",
                path,
                exc.offset,
            )

    def _prune(self, current: int) -> None:
        ckpts, wals = self._generations()
        removed = False
        for gen, p in [*ckpts.items(), *wals.items()]:
            if gen < current - 1:
                p.unlink(missing_ok=True)
                removed = True
        if removed:
            fsync_dir(self.directory)

    def _remove_temporary_files(self) -> None:
        if not self.directory.exists():
            return
        for p in self.directory.glob(".*"):
            if p.is_file() and p.name.startswith((".checkpoint.", f".{MARKER}.")):
                p.unlink(missing_ok=True)

    def _read_marker(self) -> None:
        path = self.directory / MARKER
        try:
            raw = json.loads(path.read_text())
            if raw.get("format") != 2:
                raise ValueError(f"format {raw.get('format')!r}")
        except (ValueError, AttributeError) as exc:
            raise StateError(str(path), f"not a fedmq state marker: {exc}") from None

    def _write_marker(self) -> None:
        text = json.dumps({"format": 2, "started": dt.datetime.now(dt.UTC).isoformat()}) + "\n"
        write_atomic(self.directory / MARKER, text.encode(), mode=0o600)

    def _set_aside(self, name: str) -> Path:
        target = self.directory / name
        target.mkdir(mode=0o700)
        for p in list(self.directory.iterdir()):
            if p.is_file() and (
                p.name in (MARKER, LEGACY_CHECKPOINT) or p.name.partition(".")[0] in ("checkpoint", "wal")
            ):
                os.replace(p, target / p.name)
        fsync_dir(self.directory)
        return target

    def _move_to_damaged(self, path: Path) -> Path:
        target = self.directory / DAMAGED
        target.mkdir(mode=0o700, exist_ok=True)
        dest = target / f"{path.name}.{_stamp()}"
        os.replace(path, dest)
        fsync_dir(self.directory)
        log.warning("%s set aside as %s", path, dest)
        return dest

    def _keep_prefix(self, path: Path, offset: int) -> None:
        """Copy ``path`` to damaged/ (the evidence), then cut the original at ``offset``."""
        target = self.directory / DAMAGED
        target.mkdir(mode=0o700, exist_ok=True)
        shutil.copy2(path, target / f"{path.name}.{_stamp()}")
        os.truncate(path, offset)
        fsync_dir(self.directory)


def _is_legacy(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(8)
    return bool(head) and head != b"FEDMQWAL"[: len(head)]


def _stamp() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
