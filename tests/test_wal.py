"""Tier 1-2: the write-ahead log, and crash recovery of the aggregator from checkpoint + log."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from aggregator.service import AggregatorService
from aggregator.wal import WriteAheadLog
from fedmq.config import AggregatorConfig, Config
from tests.test_seams import Recorder, feed, update_bytes


def test_appended_records_come_back_in_order(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path, 0)
    for i in range(5):
        wal.append(f"a{i}", bytes([i]) * (i + 1))
    wal.close()
    assert list(WriteAheadLog(tmp_path, 0).records()) == [(f"a{i}", bytes([i]) * (i + 1)) for i in range(5)]


def test_a_torn_tail_is_cut_and_appending_goes_on(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path, 3)
    wal.append("a", b"first")
    wal.append("b", b"second")
    wal.close()
    path = tmp_path / "wal.3"
    whole = path.read_bytes()
    for cut in range(1, 12):  # a crash in the middle of the second append, at any byte
        path.write_bytes(whole[:-cut])
        again = WriteAheadLog(tmp_path, 3)
        assert list(again.records()) == [("a", b"first")]
        again.append("c", b"third")
        again.close()
        assert list(WriteAheadLog(tmp_path, 3).records()) == [("a", b"first"), ("c", b"third")]


def test_a_corrupted_record_ends_the_log_there(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path, 0)
    for name in ("a", "b", "c"):
        wal.append(name, name.encode() * 10)
    wal.close()
    data = bytearray((tmp_path / "wal.0").read_bytes())
    data[len(data) // 2] ^= 0xFF  # flip a byte inside the second record: its CRC fails
    (tmp_path / "wal.0").write_bytes(bytes(data))
    assert [a for a, _ in WriteAheadLog(tmp_path, 0).records()] == ["a"]


def test_rotation_starts_an_empty_generation_and_deletes_older_ones(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path, 0)
    wal.append("a", b"x")
    wal.rotate(1)
    wal.append("b", b"y")
    assert sorted(p.name for p in tmp_path.glob("wal.*")) == ["wal.1"]
    assert list(wal.records()) == [("b", b"y")]


def service(tmp_path: Path, rule: str = "fedbuff") -> AggregatorService:
    cfg = Config(
        prefix="fedmq/wal",
        aggregator=AggregatorConfig(
            rule=rule, buffer_size=3, checkpoint_dir=str(tmp_path), checkpoint_every=2, max_staleness=10
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
        "last_seq": dict(core.last_seq),
        "stats": core.stats.to_dict(),
        "weights": {k: v.tobytes() for k, v in core.weights.items()},
        "rule": {
            k: [(e["weight"], {n: t.tobytes() for n, t in e["delta"].items()}) for e in v] if k == "buffer" else None
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
        assert first.rt.replayed == 0 and first._wal is not None and first._wal.appended > 0
        # kill -9: no final checkpoint, the log file is simply left behind
        second = service(d, rule)
        assert second.rt.replayed == first._wal.appended
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
    assert svc._wal is not None and svc.core is not None
    for i, p in enumerate(payloads):
        backlog.get_nowait()
        await feed(svc, rec, f"agent-{i}", p)
        if not backlog.empty():
            assert rec.receipts() == [] and rec.models() == [] and svc._wal.syncs == 0
            assert svc._last_checkpoint_version == 0
    assert svc.core.version == 2 and svc._wal.syncs == 1
    assert [(r.agent_id, r.status) for r in rec.receipts()] == [(f"agent-{i}", "accepted") for i in range(7)]
    assert [m.version for m in rec.models()] == [2]
    assert svc._last_checkpoint_version == 2
    # The burst is durable: a crash now loses none of it.
    again = service(tmp_path)
    assert snapshot(again) == snapshot(svc)


async def test_a_duplicate_in_the_same_group_is_answered_only_once_the_original_is_durable(tmp_path: Path) -> None:
    svc = service(tmp_path)
    rec = Recorder()
    backlog: asyncio.Queue[bytes] = asyncio.Queue()
    svc._incoming = backlog  # type: ignore[assignment]
    first = update_bytes(svc, "agent-1", 1, 0.1)
    for _ in range(3):
        backlog.put_nowait(first)
    backlog.get_nowait()
    await feed(svc, rec, "agent-1", first)  # accepted, written, not yet fsync'd (more waiting)
    assert svc._wal is not None and svc._wal.syncs == 0 and rec.receipts() == []
    backlog.get_nowait()
    await feed(svc, rec, "agent-1", first)  # its duplicate: the answer needs the original durable
    assert svc._wal.syncs == 1
    assert [(r.seq, r.status) for r in rec.receipts()] == [(1, "accepted"), (1, "accepted")]
