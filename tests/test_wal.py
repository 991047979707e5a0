"""Tier 1-2: the write-ahead log, and crash recovery of the aggregator from checkpoint + log."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from aggregator.service import AggregatorService
from aggregator.store import StateStore
from aggregator.wal import WalHeader, WalScan, WriteAheadLog
from fedmq.config import AggregatorConfig, Config
from fedmq.errors import StateError
from tests.test_seams import Recorder, feed, update_bytes

RUN = "0123456789abcdef0123456789abcdef"


def new_log(directory: Path, generation: int = 0, base: int = 0) -> WriteAheadLog:
    return WriteAheadLog.create(directory, WalHeader(RUN, generation, base))


def read_log(path: Path) -> list[tuple[str, bytes]]:
    return [(r.agent, r.payload) for r in WalScan(path).records()]


def test_appended_records_come_back_in_order_with_their_numbers(tmp_path: Path) -> None:
    wal = new_log(tmp_path, 0, base=7)
    for i in range(5):
        wal.write_update(f"a{i}", bytes([i]) * (i + 1), now=1.5 * i, index=10 + i)
    wal.write_event({"round": ["a", "b"]}, now=9.0)
    wal.sync()
    wal.close()
    scan = WalScan(tmp_path / "wal.0")
    records = list(scan.records())
    assert [(r.agent, r.payload, r.index) for r in records[:5]] == [
        (f"a{i}", bytes([i]) * (i + 1), 10 + i) for i in range(5)
    ]
    assert [r.lsn for r in records] == [8, 9, 10, 11, 12, 13] and records[5].event == {"round": ["a", "b"]}
    assert scan.header == WalHeader(RUN, 0, 7) and scan.torn == 0


def test_a_torn_tail_is_cut_and_appending_goes_on(tmp_path: Path) -> None:
    wal = new_log(tmp_path, 3)
    wal.write_update("a", b"first", now=0.0, index=1)
    wal.write_update("b", b"second", now=0.0, index=2)
    wal.sync()
    wal.close()
    path = tmp_path / "wal.3"
    whole = path.read_bytes()
    for cut in range(1, 20):  # a crash in the middle of the second append, at any byte
        path.write_bytes(whole[:-cut])
        scan = WalScan(path)
        assert [r.agent for r in scan.records()] == ["a"] and scan.torn > 0
        again = WriteAheadLog.resume(scan)
        again.write_update("c", b"third", now=0.0, index=2)
        again.sync()
        again.close()
        assert read_log(path) == [("a", b"first"), ("c", b"third")]


def test_a_corrupted_record_before_the_end_is_damage_named_by_offset(tmp_path: Path) -> None:
    wal = new_log(tmp_path)
    for i, name in enumerate(("a", "b", "c")):
        wal.write_update(name, name.encode() * 10, now=0.0, index=i + 1)
    wal.sync()
    wal.close()
    path = tmp_path / "wal.0"
    clean = path.read_bytes()
    second = list(WalScan(path).records())[1].offset
    for at in range(second, second + 12 + 20):  # every byte of the second record's header and some body
        data = bytearray(clean)
        data[at] ^= 0xFF
        path.write_bytes(bytes(data))
        scan = WalScan(path)
        with pytest.raises(StateError) as err:
            list(scan.records())
        assert err.value.offset == second and err.value.path == str(path)
        assert path.read_bytes() == bytes(data)  # nothing was cut


def test_a_flipped_magic_is_damage_not_an_older_format(tmp_path: Path) -> None:
    """Found by the chaos soak: a log whose first bytes no longer read FEDMQWAL looked like the older
    format and was migrated away (its records set aside). Only an upgrade may read an older log."""
    wal = new_log(tmp_path)
    wal.write_update("a", b"first", now=0.0, index=1)
    wal.sync()
    wal.close()
    path = tmp_path / "wal.0"
    clean = path.read_bytes()
    for at in range(8):
        for bit in range(8):
            data = bytearray(clean)
            data[at] ^= 1 << bit
            path.write_bytes(bytes(data))
            with pytest.raises(StateError) as err:
                WalScan(path)
            assert err.value.offset == 0 and "FEDMQWAL" in str(err.value)
            assert WalScan(path, legacy=True).legacy  # what an upgrade from the older format reads
    path.write_bytes(clean[:5])  # a header torn while the log was created is not damage
    assert list(WalScan(path).records()) == []


def test_a_current_state_with_a_flipped_magic_is_refused_at_start(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.begin_appending(store.open())
    assert store.wal is not None
    store.wal.write_update("a", b"x", now=0.0, index=1)
    store.checkpoint({"version": 0})
    store.wal.write_update("b", b"y", now=0.0, index=2)
    store.close()
    wal = tmp_path / "wal.1"
    data = bytearray(wal.read_bytes())
    data[0] ^= 0x01
    wal.write_bytes(bytes(data))
    with pytest.raises(StateError) as err:
        StateStore(tmp_path).open()
    assert err.value.path == str(wal)
    assert wal.read_bytes() == bytes(data)  # evidence kept where it was, nothing set aside


def test_a_checkpoint_keeps_the_previous_generation_and_prunes_older_ones(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    restored = store.open()
    store.begin_appending(restored)
    assert store.wal is not None
    store.wal.write_update("a", b"x", now=0.0, index=1)
    store.checkpoint({"version": 0})
    assert sorted(p.name for p in tmp_path.iterdir() if p.name[0] != ".") == [
        "checkpoint.1", "fedmq-state.json", "wal.0", "wal.1"
    ]  # fmt: skip
    store.wal.write_update("b", b"y", now=0.0, index=2)
    store.checkpoint({"version": 1})
    store.checkpoint({"version": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint.2", "checkpoint.3", "fedmq-state.json", "wal.2", "wal.3"
    ]  # fmt: skip
    for p in tmp_path.iterdir():
        assert p.stat().st_mode & 0o777 == 0o600, p


def service(tmp_path: Path, rule: str = "fedbuff") -> AggregatorService:
    cfg = Config(
        prefix="fedmq/wal",
        aggregator=AggregatorConfig(
            rule=rule, buffer_size=3, checkpoint_dir=str(tmp_path), checkpoint_every=2, max_staleness=10, rate_limit=0
        ),
    ).validate()
    svc = AggregatorService(cfg)
    svc.startup()
    return svc


def snapshot(svc: AggregatorService) -> dict[str, object]:
    core = svc.core
    assert core is not None
    return {
        "version": core.version,
        "agents": core.state_dict()["agents"],
        "stats": core.stats.to_dict(),
        "weights": {k: v.tobytes() for k, v in core.weights.items()},
        "rule": {
            k: [(e["agent_id"], e["weight"], {n: t.tobytes() for n, t in e["delta"].items()}) for e in v]
            if k == "buffer"
            else None
            for k, v in core.rule.state_dict().items()
        },
    }


async def test_a_crash_between_checkpoints_loses_nothing_that_was_logged(tmp_path: Path) -> None:
    for rule in ("fedbuff", "fedasync"):
        d = tmp_path / rule
        first = service(d, rule)
        rec = Recorder()
        rng = np.random.default_rng(0)
        for i in range(11):  # checkpoints at versions 2 and 4 (fedbuff), 2, 4, ... (fedasync); a tail after
            agent = f"agent-{i % 4}"
            base = first.core.version if first.core is not None else 0
            await feed(first, rec, agent, update_bytes(first, agent, i + 1, float(rng.normal(0, 0.1)), base=base))
        before = snapshot(first)
        assert first.store is not None and first.store.wal is not None
        appended = first.store.wal.appended
        assert first.rt.replayed == 0 and appended > 0
        # kill -9: no final checkpoint, the log file is simply left behind
        second = service(d, rule)
        assert second.rt.replayed == appended
        assert snapshot(second) == before, rule


async def test_receipts_answer_every_update_and_a_resend_gets_the_original_again(tmp_path: Path) -> None:
    svc = service(tmp_path)
    rec = Recorder()
    first = update_bytes(svc, "agent-1", 1, 0.1)
    await feed(svc, rec, "agent-1", first)
    await feed(svc, rec, "agent-2", update_bytes(svc, "agent-2", 1, 0.1, base=5))  # ahead: rejected
    await feed(svc, rec, "agent-1", first)  # a re-send (its receipt was lost)
    r = rec.receipts()
    assert [(x.agent_id, x.seq, x.status, x.reason) for x in r] == [
        ("agent-1", 1, "accepted", None),
        ("agent-2", 1, "rejected", "unknown_base_version"),
        ("agent-1", 1, "accepted", None),
    ]
    assert r[0].version == r[2].version == 0
    topics = [t for t, _, _, _ in rec.published if "/receipt/" in t]
    assert topics == ["fedmq/wal/receipt/agent-1", "fedmq/wal/receipt/agent-2", "fedmq/wal/receipt/agent-1"]
    # ... also after a crash: the log restores what was accepted, receipts included.
    again = service(tmp_path)
    rec2 = Recorder()
    await feed(again, rec2, "agent-1", first)
    assert [(x.seq, x.status, x.version) for x in rec2.receipts()] == [(1, "accepted", 0)]
    assert again.core is not None and again.core.stats.accepted == 1


async def test_group_commit_fsyncs_a_burst_once_and_says_nothing_before_it(tmp_path: Path) -> None:
    """Updates waiting behind each other share one fsync; until it, no receipt is sent and no
    version they made is published or checkpointed (a crash would take them back)."""
    svc = service(tmp_path)  # FedBuff K=3, a checkpoint every 2 versions
    rec = Recorder()
    backlog: asyncio.Queue[bytes] = asyncio.Queue()
    svc._incoming = backlog  # type: ignore[assignment]  # stands in for aiomqtt's incoming queue
    payloads = [update_bytes(svc, f"agent-{i}", 1, 0.1) for i in range(7)]
    for p in payloads:
        backlog.put_nowait(p)
    assert svc.store is not None and svc.store.wal is not None and svc.core is not None
    wal = svc.store.wal
    for i, p in enumerate(payloads):
        backlog.get_nowait()
        await feed(svc, rec, f"agent-{i}", p)
        if not backlog.empty():
            assert rec.receipts() == [] and rec.models() == [] and wal.syncs == 0
            assert not any(tmp_path.glob("checkpoint.*"))
    assert svc.core.version == 2 and wal.syncs == 1  # the burst's fsync; the checkpoint finds nothing more to fsync
    assert [(r.agent_id, r.status) for r in rec.receipts()] == [(f"agent-{i}", "accepted") for i in range(7)]
    assert [m.version for m in rec.models()] == [2]
    assert sorted(p.name for p in tmp_path.glob("checkpoint.*")) == ["checkpoint.1"]
    # The burst is durable: a crash now loses none of it.
    again = service(tmp_path)
    assert snapshot(again) == snapshot(svc)


async def test_a_duplicate_in_the_same_group_is_answered_only_once_the_original_is_durable(tmp_path: Path) -> None:
    """A re-send of an update still waiting for its fsync gets its receipt with the group, not before."""
    svc = service(tmp_path)
    rec = Recorder()
    backlog: asyncio.Queue[bytes] = asyncio.Queue()
    svc._incoming = backlog  # type: ignore[assignment]
    first = update_bytes(svc, "agent-1", 1, 0.1)
    for _ in range(3):
        backlog.put_nowait(first)
    backlog.get_nowait()
    await feed(svc, rec, "agent-1", first)  # accepted, written, not yet fsync'd (more waiting)
    assert svc.store is not None and svc.store.wal is not None
    wal = svc.store.wal
    assert wal.syncs == 0 and rec.receipts() == []
    backlog.get_nowait()
    await feed(svc, rec, "agent-1", first)  # its duplicate waits in the same group: nothing yet
    assert wal.syncs == 0 and rec.receipts() == []
    backlog.get_nowait()
    await feed(svc, rec, "agent-1", first)  # the queue runs dry: one fsync, then both answers
    assert wal.syncs == 1
    assert [(r.seq, r.status, r.index) for r in rec.receipts()] == [(1, "accepted", 1)] * 3


# --- the pipelined group commit ---------------------------------------------------------------


def test_records_appended_while_a_commit_is_in_flight_go_into_the_next_one(tmp_path: Path) -> None:
    """commit_async seals what was appended; later records wait for the next commit."""
    wal = new_log(tmp_path)
    big = np.arange(300_000, dtype=np.float32).tobytes()  # 1.2 MB: spans whole blocks and a partial one
    wal.write_update("a", big, now=0.0, index=1)
    first = wal.commit_async()
    wal.write_update("b", b"small", now=0.0, index=2)  # appended while the first commit may be writing
    first.result(timeout=60)
    scan = WalScan(wal.path)
    assert [r.agent for r in scan.records()] == ["a"]
    assert scan.end == wal.synced_offset < wal.offset  # "b" is not on disk yet
    wal.commit_async().result(timeout=60)
    assert wal.synced_offset == wal.offset
    assert [(r.agent, r.payload) for r in WalScan(wal.path).records()] == [("a", big), ("b", b"small")]
    assert wal.commit_async().result(timeout=60) is None and wal.syncs == 2  # nothing new: no fsync
    wal.close()


@pytest.mark.parametrize("direct", [True, False], ids=["O_DIRECT", "page-cache"])
def test_many_commits_of_every_size_make_the_same_file_with_and_without_direct_io(tmp_path: Path, direct: bool) -> None:
    """Commits end anywhere in a block; the next rewrites that block whole. The bytes are the
    same as one plain sequential write of the records, with direct I/O or without."""
    rng = np.random.default_rng(1)
    wal = new_log(tmp_path)
    if not direct:
        wal._direct_fd = -1  # as on a file system without O_DIRECT (tmpfs)
    elif not wal.direct:
        pytest.skip("this file system refuses O_DIRECT")
    expected = []
    for i in range(60):
        size = int(rng.choice([1, 100, 4095, 4096, 4097, 9000, 70_000, 9_000_000]))
        payload = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        wal.write_update(f"a{i}", payload, now=float(i), index=i + 1)
        expected.append((f"a{i}", payload))
        if rng.random() < 0.5:
            wal.sync()
    wal.sync()
    wal.close()
    scan = WalScan(tmp_path / "wal.0")
    assert [(r.agent, r.payload) for r in scan.records()] == expected
    assert scan.end == (tmp_path / "wal.0").stat().st_size and scan.torn == 0


def test_resuming_a_log_that_ends_inside_a_block_keeps_its_records(tmp_path: Path) -> None:
    """The first commit after a restart rewrites the partial block the file ends in."""
    wal = new_log(tmp_path)
    wal.write_update("a", b"x" * 5000, now=0.0, index=1)
    wal.sync()
    wal.close()
    assert (tmp_path / "wal.0").stat().st_size % 4096 != 0
    scan = WalScan(tmp_path / "wal.0")
    assert [r.agent for r in scan.records()] == ["a"]  # a log is scanned to its end before it is resumed
    again = WriteAheadLog.resume(scan)
    again.write_update("b", b"y" * 10_000, now=0.0, index=2)
    again.sync()
    again.close()
    assert read_log(tmp_path / "wal.0") == [("a", b"x" * 5000), ("b", b"y" * 10_000)]


def test_a_failed_commit_says_so_and_the_log_cuts_back_to_what_is_durable(tmp_path: Path) -> None:
    """The commit's future carries the OSError; drop_unsynced leaves only what was fsync'd."""
    wal = new_log(tmp_path)
    wal.write_update("a", b"kept", now=0.0, index=1)
    wal.sync()
    wal.write_update("b", b"lost", now=0.0, index=2)
    os.close(wal._fd)  # the next write fails as a dead disk would (EBADF)
    if wal._direct_fd >= 0:
        os.close(wal._direct_fd)
    done = wal.commit_async()
    with pytest.raises(OSError):
        done.result(timeout=60)
    wal._fd = wal._direct_fd = -1  # closed above
    wal.drop_unsynced()
    assert read_log(tmp_path / "wal.0") == [("a", b"kept")]


async def test_intake_goes_on_while_a_group_commits_and_receipts_follow_their_group(tmp_path: Path) -> None:
    """With the committer running, an fsync in flight holds back only its own group's receipts
    and version: updates behind it are decoded, decided and logged meanwhile, and go out with
    the next group, in order."""
    svc = service(tmp_path)  # FedBuff K=3, a checkpoint every 2 versions
    assert svc.store is not None and svc.store.wal is not None and svc.core is not None
    wal = svc.store.wal
    gate, held = threading.Event(), threading.Event()
    slow_commit = wal.commit

    def held_commit(commit: object) -> None:
        held.set()
        gate.wait(60)  # the disk is slow: this fsync takes as long as the test says
        slow_commit(commit)  # type: ignore[arg-type]

    wal.commit = held_commit  # type: ignore[method-assign]
    rec = Recorder()
    committer = asyncio.create_task(svc._committer())
    try:
        await asyncio.sleep(0)  # the committer starts (it marks the service pipelined)
        assert svc._pipelined
        await svc.handle(f"{svc.topics.prefix}/update/agent-0", update_bytes(svc, "agent-0", 1, 0.1))
        assert await asyncio.to_thread(held.wait, 60)  # the first group is sealed and its fsync is held
        for i in range(1, 5):  # meanwhile: taken, decided and logged, not receipted
            await svc.handle(f"{svc.topics.prefix}/update/agent-{i}", update_bytes(svc, f"agent-{i}", 1, 0.1))
        await svc.publish_pending(rec)
        assert svc.core.stats.accepted == 5 and svc.core.version == 1
        assert rec.receipts() == [] and rec.models() == []
        gate.set()
        # A barrier reaps the released fsync and commits the rest: then every receipt is out.
        await asyncio.wait_for(svc._serialized(svc._flush_locked), 60)
        await svc.publish_pending(rec)
        assert [r.agent_id for r in rec.receipts()] == [f"agent-{i}" for i in range(5)]
        assert [m.version for m in rec.models()][-1] == 1
    finally:
        gate.set()
        committer.cancel()
        await asyncio.gather(committer, return_exceptions=True)
        await svc._serialized(svc._close_state)
    again = service(tmp_path)  # everything receipted is on disk
    assert again.core is not None and again.core.stats.accepted == 5 and again.core.version == 1
