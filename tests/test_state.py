"""Issue 11: no receipted update lost, state that detects its own damage, bounded shutdown.

Each numbered problem of the issue is a test here; those that involve real processes, a real
broker or a real (tiny) file system start them."""

from __future__ import annotations

import asyncio
import random
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import aggregator.store as store_module
from aggregator.service import AggregatorService
from aggregator.wal import WalScan
from fedmq.config import AgentConfig, AggregatorConfig, Config
from fedmq.errors import ConfigError
from tests.test_seams import Recorder, feed, update_bytes

ROOT = Path(__file__).resolve().parents[1]


def stateful(tmp_path: Path, **agg: Any) -> AggregatorService:
    fields: dict[str, Any] = {
        "rule": "fedbuff",
        "buffer_size": 2,
        "checkpoint_dir": str(tmp_path),
        "checkpoint_every": 1000,
        "max_staleness": 100,
    }
    fields.update(agg)
    svc = AggregatorService(Config(prefix="fedmq/state", aggregator=AggregatorConfig(**fields)).validate())
    svc.startup()
    return svc


async def send(svc: AggregatorService, rec: Recorder, agent: str, seq: int, value: float = 0.01) -> None:
    assert svc.core is not None
    await feed(svc, rec, agent, update_bytes(svc, agent, seq, value, base=svc.core.version))


def accepted(rec: Recorder) -> dict[tuple[str, int], int]:
    return {(r.agent_id, r.seq): r.index for r in rec.receipts() if r.status == "accepted"}  # type: ignore[misc]


# --- 1. a cancellation between checkpoint and log rotation ---------------------------------------
async def test_a_checkpoint_cancelled_halfway_loses_no_receipted_update(tmp_path: Path, monkeypatch: Any) -> None:
    """The publisher fails (broker gone) while a checkpoint is being written; TaskGroup cancels the
    receive task that runs it. Then kill -9 before the next checkpoint: every receipted update
    must come back, and no application index may be handed out twice."""
    svc = stateful(tmp_path)
    rec = Recorder()
    for i in range(4):
        await send(svc, rec, f"a{i}", 1)
    loop = asyncio.get_running_loop()
    victim: list[asyncio.Task[Any]] = []
    real = store_module.write_state

    def write_then_cancel(*args: Any, **kw: Any) -> int:
        size = real(*args, **kw)
        loop.call_soon_threadsafe(victim[0].cancel)  # the checkpoint is on disk, its log not yet started
        return size

    monkeypatch.setattr(store_module, "write_state", write_then_cancel)
    victim.append(asyncio.ensure_future(svc.checkpoint()))
    with pytest.raises(asyncio.CancelledError):
        await victim[0]
    monkeypatch.undo()
    for i in range(4, 9):  # the service carries on (a reconnect) and receipts more
        await send(svc, rec, f"a{i}", 1)
    receipted = accepted(rec)
    assert len(receipted) == 9
    again = stateful(tmp_path)  # kill -9: no final checkpoint
    assert again.core is not None and again.core.stats.accepted == 9
    for (agent, seq), index in receipted.items():
        kept = again.core.receipt_for(agent, seq)
        assert kept is not None and kept[1] == index, (agent, seq)
    rec2 = Recorder()
    await send(again, rec2, "late", 1)
    assert accepted(rec2)[("late", 1)] == 10  # a new index, not one already receipted


# --- 2. a damaged log record is corruption, not a torn tail --------------------------------------
async def test_one_corrupted_byte_in_a_log_record_stops_the_start_naming_file_and_offset(tmp_path: Path) -> None:
    svc = stateful(tmp_path)
    rec = Recorder()
    for i in range(3):
        await send(svc, rec, f"a{i}", 1)
    wal = next(tmp_path.glob("wal.*"))
    data = bytearray(wal.read_bytes())
    middle = len(data) // 2
    data[middle] ^= 0x01
    wal.write_bytes(bytes(data))
    with pytest.raises(ConfigError) as err:
        stateful(tmp_path)
    assert str(wal) in str(err.value) and "offset" in str(err.value)
    assert wal.read_bytes() == bytes(data)  # the evidence is kept


async def test_only_an_incomplete_last_record_is_cut(tmp_path: Path) -> None:
    """A crash in the middle of an append leaves the start of a record: the start cuts just that."""
    svc = stateful(tmp_path)
    rec = Recorder()
    for i in range(3):
        await send(svc, rec, f"a{i}", 1)
    wal = next(tmp_path.glob("wal.*"))
    whole = wal.read_bytes()
    last = list(WalScan(wal).records())[-1].offset
    wal.write_bytes(whole + whole[last:-7])  # another record, all but its last 7 bytes: a killed append
    again = stateful(tmp_path)
    assert again.core is not None and again.core.stats.accepted == 3 and again.rt.replayed == 3
    assert wal.read_bytes() == whole


# --- 3. the checkpoint carries a checksum ---------------------------------------------------------
async def test_a_bit_flipped_in_a_checkpointed_weight_is_detected(tmp_path: Path) -> None:
    svc = stateful(tmp_path, checkpoint_every=1)
    rec = Recorder()
    for i in range(4):
        await send(svc, rec, f"a{i}", 1, value=0.5)
    assert svc.core is not None and svc.core.version == 2
    ckpt = checkpoint_file(tmp_path)
    data = bytearray(ckpt.read_bytes())
    weight = svc.core.weights["W"].astype("<f4").tobytes()
    at = data.find(weight[:64])
    assert at > 0
    data[at + 3] ^= 0x01  # one exponent bit of the first weight: it is 4x (or a quarter) of itself, still finite
    ckpt.write_bytes(bytes(data))
    with pytest.raises(ConfigError) as err:
        stateful(tmp_path, checkpoint_every=1)
    assert str(ckpt) in str(err.value)


async def test_random_byte_flips_in_the_checkpoint_are_all_detected(tmp_path: Path) -> None:
    svc = stateful(tmp_path, checkpoint_every=1)
    rec = Recorder()
    for i in range(4):
        await send(svc, rec, f"a{i}", 1)
    ckpt = checkpoint_file(tmp_path)
    clean = ckpt.read_bytes()
    rng = random.Random(4)
    for _ in range(20):
        data = bytearray(clean)
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        ckpt.write_bytes(bytes(data))
        with pytest.raises(ConfigError):
            stateful(tmp_path, checkpoint_every=1)
    ckpt.write_bytes(clean)
    assert stateful(tmp_path, checkpoint_every=1).core.version == 2  # type: ignore[union-attr]


def checkpoint_file(directory: Path) -> Path:
    files = sorted(p for p in directory.iterdir() if p.name.startswith(("aggregator.ckpt", "checkpoint.")))
    assert files, list(directory.iterdir())
    return files[-1]


# --- 5. state that went missing -------------------------------------------------------------------
async def test_a_missing_checkpoint_or_log_refuses_to_start_without_fresh(tmp_path: Path) -> None:
    svc = stateful(tmp_path, checkpoint_every=1)
    rec = Recorder()
    for i in range(4):
        await send(svc, rec, f"a{i}", 1)
    checkpoint_file(tmp_path).unlink()
    with pytest.raises(ConfigError, match="missing"):
        stateful(tmp_path, checkpoint_every=1)
    for p in tmp_path.glob("wal.*"):
        p.unlink()
    with pytest.raises(ConfigError, match="missing"):
        stateful(tmp_path, checkpoint_every=1)
    fresh = AggregatorService(
        Config(
            prefix="fedmq/state",
            aggregator=AggregatorConfig(rule="fedbuff", buffer_size=2, checkpoint_dir=str(tmp_path)),
        ).validate(),
        fresh=True,  # type: ignore[call-arg]
    )
    fresh.startup()
    assert fresh.core is not None and fresh.core.version == 0


# --- 8. an outbox entry that no longer decodes ---------------------------------------------------
async def test_an_undecodable_outbox_entry_is_quarantined_not_resent_forever(tmp_path: Path) -> None:
    from dataclasses import replace

    from edge_agent.service import AgentService
    from edge_agent.trainer import LocalTrainer
    from fedmq.config import PrivacyConfig
    from models.datasets import digits

    box = tmp_path / "pi.outbox"
    box.mkdir()
    (box / f"{7:020d}.update").write_bytes(b"\xc1 not an update")
    train, _ = digits()
    acfg = AgentConfig(agent_id="pi", state_dir=str(tmp_path))
    trainer = LocalTrainer(acfg, PrivacyConfig(), train.subset(np.arange(20)), rng=np.random.default_rng(0))
    dev = AgentService(replace(Config(prefix="fedmq/state"), agent=acfg), trainer)
    rec = Recorder()
    await dev._flush_outbox(rec)  # type: ignore[arg-type]
    assert rec.published == [] and len(dev.outbox) == 0
    assert dev.stats.quarantined == 1  # type: ignore[attr-defined]
    assert [p.name for p in (box / "quarantine").iterdir()] == [f"{7:020d}.update"]


# --- 9. one description of the dedupe window -----------------------------------------------------
def test_the_docs_describe_one_dedupe_window() -> None:
    protocol = (ROOT / "docs" / "protocol.md").read_text()
    reliability = (ROOT / "docs" / "reliability.md").read_text()
    assert "last 64" not in protocol and "64-sequence" not in protocol
    for text in (protocol, reliability):
        assert "oldest_pending" in text and "4,096" in text


# --- 10. the service's own loose ends -------------------------------------------------------------
def test_evaluation_labels_outside_the_model_fail_at_startup(tmp_path: Path) -> None:
    x = np.zeros((5, 64), np.float32)
    y = np.array([0, 1, 2, 3, 10])
    np.savez(tmp_path / "eval.npz", x=x, y=y)
    cfg = Config(aggregator=AggregatorConfig(eval_data=str(tmp_path / "eval.npz"))).validate()
    with pytest.raises(ConfigError, match=r"aggregator\.eval_data"):
        AggregatorService(cfg).startup()


async def test_an_evaluator_error_ends_the_service_with_that_error_and_the_state_closed(tmp_path: Path) -> None:
    """The evaluator used to run outside any TaskGroup: its errors vanished and the service went on
    without accuracy. Now an error there is ours: the service stops with it, its state flushed."""
    from broker.launcher import free_port
    from fedmq.config import BrokerConfig

    x = np.zeros((4, 64), np.float32)
    np.savez(tmp_path / "eval.npz", x=x, y=np.array([0, 1, 2, 3]))
    fields = {"rule": "fedbuff", "checkpoint_dir": str(tmp_path / "state"), "eval_data": str(tmp_path / "eval.npz")}
    broker = BrokerConfig(port=free_port())  # nobody listens: the service keeps reconnecting meanwhile
    cfg = Config(prefix="fedmq/eval", broker=broker, aggregator=AggregatorConfig(**fields)).validate()
    svc = AggregatorService(cfg)
    svc.startup()

    def broken(weights: dict[str, Any]) -> tuple[float, float]:
        raise RuntimeError("evaluation broke")

    svc._evaluate = broken  # type: ignore[method-assign]
    with pytest.raises(ExceptionGroup) as caught:
        async with asyncio.timeout(60):
            await svc.run(asyncio.Event())
    assert caught.group_contains(RuntimeError, match="evaluation broke")
    again = AggregatorService(svc.config)  # closed cleanly: the next start resumes the same run
    again.startup()
    assert again.core is not None and svc.core is not None and again.core.run_id == svc.core.run_id


async def test_receipts_dropped_on_a_full_queue_are_counted(tmp_path: Path) -> None:
    svc = stateful(tmp_path)
    for seq in range(1, svc.INCOMING_QUEUE + 50):  # rejections (ahead of the model), no publisher running
        await svc.handle("fedmq/state/update/a", update_bytes(svc, "a", seq, 0.01, base=99))
    assert svc.progress().dropped_receipts == 49  # type: ignore[attr-defined]


def test_the_evaluation_history_is_bounded(tmp_path: Path) -> None:
    from aggregator.service import EvalPoint

    svc = stateful(tmp_path)
    for v in range(50_000):
        svc.rt.record_eval(EvalPoint(float(v), v, 0.5, 1.0))  # type: ignore[attr-defined]
    history = svc.summary()["accuracy_history"]
    assert len(history) <= 2048 and history[0][1] == 0 and history[-1][1] == 49_999


async def test_heavy_decodes_and_krum_run_off_the_event_loop_and_cheap_decodes_stay_on_it(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """A decode that converts every element (here fp16 of a 614K-parameter model) and Krum's
    O(K^2 d) step go to a worker thread. A plain float32 update of the same model decodes into
    views of its payload and stays on the loop: the hand-off would cost more than the decode."""
    import aggregator.rules.robust as robust_rules
    import fedmq.messages as messages
    from fedmq.compression import compress

    svc = stateful(tmp_path, model="mlp", hidden=8192, robust="krum", buffer_size=5, krum_f=1)
    threads: dict[str, list[tuple[int, str]]] = {"decode": [], "krum": []}
    real_decode, real_select = messages.UpdateMessage.from_bytes, robust_rules.multi_krum_select

    def decode(payload: Any, limits: Any = messages.DEFAULT_LIMITS) -> Any:
        threads["decode"].append((len(payload), threading.current_thread().name))
        return real_decode(payload, limits)

    def select(*args: Any) -> Any:
        threads["krum"].append((0, threading.current_thread().name))
        return real_select(*args)

    monkeypatch.setattr(messages.UpdateMessage, "from_bytes", staticmethod(decode))
    monkeypatch.setattr(robust_rules, "multi_krum_select", select)
    monkeypatch.setattr("aggregator.robust.multi_krum_select", select)
    rec = Recorder()
    assert svc.core is not None
    weights = svc.core.weights
    for i in range(4):
        delta = {k: np.full(v.shape, 0.01, np.float32) for k, v in weights.items()}
        wire = {k: compress("fp16", v) for k, v in delta.items()}
        message = messages.UpdateMessage(f"a{i}", 1, 0, 10, delta, wire=wire)
        await feed(svc, rec, f"a{i}", message.to_bytes())
    await send(svc, rec, "plain", 1)  # the fifth: fills the buffer, Krum runs
    assert svc.core.version == 1 and svc.core.stats.accepted == 5
    main = threading.main_thread().name
    fp16 = [name for size, name in threads["decode"] if size < 4 * 614_000]
    plain = [name for size, name in threads["decode"] if size >= 4 * 614_000]
    assert len(fp16) == 4 and main not in fp16
    assert plain == [main]
    assert threads["krum"] and all(name != main for _, name in threads["krum"])
