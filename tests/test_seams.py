"""Tier 2: the seam between transport and core. Raw frames (truncated at every byte, duplicated,
malformed) go through the aggregator service's own message handlers; the publisher is a
recorder, so the test sees exactly what the service would send."""

from __future__ import annotations

import asyncio
import logging
import tracemalloc
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from aggregator.service import AggregatorService
from fedmq.config import AggregatorConfig, BrokerConfig, Config
from fedmq.errors import ConfigError
from fedmq.messages import ModelMessage, ReceiptMessage, StatusMessage, UpdateMessage
from fedmq.state import write_state
from models.datasets import digits
from runtime import transport
from tests.hostile import MARKER, corpus


class Recorder:
    """Stands in for the MQTT client's publish side only."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes, int, bool]] = []

    async def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        self.published.append((topic, payload, qos, retain))

    def models(self) -> list[ModelMessage]:
        return [ModelMessage.from_bytes(p) for t, p, _, _ in self.published if t.endswith("/model")]

    def receipts(self) -> list[ReceiptMessage]:
        return [ReceiptMessage.from_bytes(p) for t, p, _, _ in self.published if "/receipt/" in t]


async def feed(svc: AggregatorService, rec: Recorder, agent: str, frame: bytes, kind: str = "update") -> None:
    """Hand one raw frame to the service as if it arrived on ``agent``'s topic, then publish what it made."""
    await svc.handle(f"{svc.topics.prefix}/{kind}/{agent}", frame)
    await svc.publish_pending(rec)


def make_service(tmp_path: Path | None = None, **agg: Any) -> AggregatorService:
    cfg = Config(prefix="fedmq/seam", aggregator=replace(AggregatorConfig(rule="fedbuff", buffer_size=2), **agg))
    if tmp_path is not None:
        cfg = replace(cfg, aggregator=replace(cfg.aggregator, checkpoint_dir=str(tmp_path), checkpoint_every=1))
    svc = AggregatorService(cfg.validate())
    svc.startup()
    return svc


def update_bytes(svc: AggregatorService, agent: str, seq: int, value: float, base: int = 0) -> bytes:
    assert svc.core is not None
    delta = {k: np.full(v.shape, value, v.dtype) for k, v in svc.core.weights.items()}
    return UpdateMessage(agent_id=agent, seq=seq, base_version=base, num_examples=10, delta=delta).to_bytes()


async def test_truncation_at_every_byte_is_rejected_and_harmless() -> None:
    svc = make_service()
    rec = Recorder()
    good = update_bytes(svc, "a", 1, 0.01)
    for cut in range(len(good) - 1, -1, -97):
        await feed(svc, rec, "a", good[:cut])
    assert svc.core is not None
    assert svc.core.stats.accepted == 0 and svc.core.version == 0
    assert set(svc.core.stats.rejected) == {"malformed"}
    await feed(svc, rec, "a", good)
    assert svc.core.stats.accepted == 1


async def test_duplicates_leave_the_model_bit_identical() -> None:
    once, twice = make_service(), make_service()
    rec1, rec2 = Recorder(), Recorder()
    frames = [
        ("a", update_bytes(once, "a", 1, 0.1)),
        ("b", update_bytes(once, "b", 1, -0.3)),
        ("a", update_bytes(once, "a", 2, 0.2, base=1)),
        ("c", update_bytes(once, "c", 1, 0.5, base=1)),
    ]
    for agent, f in frames:
        await feed(once, rec1, agent, f)
    for agent, f in frames:
        for _ in range(3):
            await feed(twice, rec2, agent, f)
    assert once.core is not None and twice.core is not None
    assert once.core.version == twice.core.version == 2
    for k, v in once.core.weights.items():
        assert np.array_equal(v, twice.core.weights[k])
    # Re-sends of accepted updates are answered with their receipt and counted apart: no fault.
    assert twice.core.stats.duplicates == 8 and "duplicate" not in twice.core.stats.rejected
    assert [m.version for m in rec2.models()] == [1, 2]


async def test_garbage_spoofing_and_mismatch_are_counted_by_reason() -> None:
    svc = make_service()
    rec = Recorder()
    await feed(svc, rec, "a", b"\xc1")  # msgpack's never-used byte
    await feed(svc, rec, "a", update_bytes(svc, "b", 1, 0.1))
    await feed(
        svc,
        rec,
        "a",
        UpdateMessage(
            agent_id="a", seq=1, base_version=0, num_examples=1, delta={"W": np.zeros(3, np.float32)}
        ).to_bytes(),
    )
    await feed(svc, rec, "a", update_bytes(svc, "a", 1, 0.1, base=9))
    assert svc.core is not None
    assert dict(svc.core.stats.rejected) == {
        "malformed": 1,
        "agent_id_mismatch": 1,
        "model_mismatch": 1,
        "unknown_base_version": 1,
    }
    assert svc.progress().rejected == 4 and rec.models() == []
    # Each update is answered on the sender's receipt topic; the garbage, whose seq cannot be read, as seq 0.
    assert [(r.agent_id, r.status, r.reason) for r in rec.receipts()] == [
        ("a", "rejected", "malformed"),
        ("a", "rejected", "agent_id_mismatch"),
        ("a", "rejected", "model_mismatch"),
        ("a", "rejected", "unknown_base_version"),
    ]
    garbage = rec.receipts()[0]
    assert garbage.seq == 0 and garbage.detail is not None and "msgpack" in garbage.detail


async def test_status_frames_track_liveness_and_empty_retained_means_offline() -> None:
    svc = make_service()
    rec = Recorder()
    await feed(svc, rec, "a", StatusMessage("a", "online").to_bytes(), kind="status")
    await feed(svc, rec, "b", StatusMessage("b", "online").to_bytes(), kind="status")
    await feed(svc, rec, "c", StatusMessage("a", "online").to_bytes(), kind="status")  # spoofed
    await feed(svc, rec, "d", b"\x00garbage", kind="status")
    assert svc.core is not None and svc.core.online == {"a", "b"}
    await feed(svc, rec, "a", b"", kind="status")
    await feed(svc, rec, "b", StatusMessage("b", "offline").to_bytes(), kind="status")
    assert svc.core.online == set()


async def test_sync_service_opens_a_round_when_enough_agents_are_online() -> None:
    svc = make_service(rule="fedavg", sync_agents=2)
    rec = Recorder()
    await feed(svc, rec, "a", StatusMessage("a", "online").to_bytes(), kind="status")
    assert rec.models() == []
    await feed(svc, rec, "b", StatusMessage("b", "online").to_bytes(), kind="status")
    models = rec.models()
    assert len(models) == 1 and models[0].mode == "sync" and models[0].selected == ("a", "b")
    await feed(svc, rec, "a", update_bytes(svc, "a", 1, 1.0))
    await feed(svc, rec, "b", update_bytes(svc, "b", 1, 3.0))
    models = rec.models()
    assert models[-1].version == 1 and models[-1].selected == ("a", "b")
    np.testing.assert_allclose(models[-1].tensors["b"], [2.0] * 10)


async def test_versions_are_checkpointed_and_restored(tmp_path: Path) -> None:
    svc = make_service(tmp_path)
    rec = Recorder()
    for i, agent in enumerate("abcd"):
        await feed(svc, rec, agent, update_bytes(svc, agent, 1, 0.1 * i))
    assert svc.core is not None and svc.core.version == 2
    again = make_service(tmp_path)
    assert again.core is not None and again.core.version == 2 and again.core.last_seq == svc.core.last_seq
    for k, v in svc.core.weights.items():
        assert np.array_equal(v, again.core.weights[k])


def test_startup_fails_fast_on_a_foreign_checkpoint_and_bad_eval_data(tmp_path: Path) -> None:
    write_state(tmp_path / "aggregator.ckpt", "aggregator-checkpoint", {"rule": "fedasync"})
    with pytest.raises(ConfigError, match=r"aggregator\.checkpoint_dir"):
        make_service(tmp_path)
    with pytest.raises(ConfigError, match=r"aggregator\.eval_data"):
        make_service(eval_data="/nonexistent.npz")
    with pytest.raises(ConfigError, match=r"aggregator\.model"):
        make_service(model="resnet")


async def test_evaluation_reports_accuracy() -> None:
    _, test = digits()
    cfg = Config(aggregator=AggregatorConfig(eval_data="builtin:digits-test")).validate()
    svc = AggregatorService(cfg)
    svc.startup()
    assert svc.eval_data is not None and len(svc.eval_data) == len(test)
    await svc._evaluate_current()
    assert svc.progress().accuracy is not None and 0 <= svc.progress().accuracy <= 1  # type: ignore[operator]


class SwallowingClient:
    """A publish that, like asyncio.wait_for on Python 3.11, drops a cancellation arriving as it completes."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.swallowed = False

    async def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        self.entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            if self.swallowed:
                raise
            self.swallowed = True  # the PUBACK "arrived" at the same moment: this cancellation is lost


async def test_publish_helper_reraises_a_swallowed_cancellation() -> None:
    client = SwallowingClient()
    loops = 0

    async def service_loop() -> None:
        nonlocal loops
        while True:  # a loop that would run forever if the cancellation stayed swallowed
            await transport.publish(client, "t", b"x", qos=1)  # type: ignore[arg-type]
            loops += 1

    task = asyncio.create_task(service_loop())
    await client.entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(5):  # a swallowed cancellation would hang here: fail fast instead
            await task
    assert loops == 0


async def test_incoming_queue_overflow_is_counted_not_silent() -> None:
    svc = make_service()
    queue = svc._incoming_queue_type()(maxsize=2)
    for _ in range(2):
        queue.put_nowait(object())  # type: ignore[arg-type]
    with pytest.raises(asyncio.QueueFull):
        queue.put_nowait(object())  # type: ignore[arg-type]
    assert svc.rt.dropped_overload == 1
    assert svc.progress().dropped_overload == 1 and svc.summary()["dropped_overload"] == 1


HOSTILE_LIMIT = 256 * 1024


def hostile_service() -> AggregatorService:
    cfg = Config(
        prefix="fedmq/seam",
        broker=BrokerConfig(max_payload_bytes=HOSTILE_LIMIT),
        aggregator=AggregatorConfig(rule="fedbuff", buffer_size=2, max_staleness=1),
    )
    svc = AggregatorService(cfg.validate())
    svc.startup()
    return svc


async def test_hostile_corpus_is_refused_counted_logged_once_and_changes_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clean, attacked = hostile_service(), hostile_service()
    rec = Recorder()
    honest = [
        ("a", update_bytes(clean, "a", 1, 0.1)),
        ("b", update_bytes(clean, "b", 1, -0.3)),
        ("a", update_bytes(clean, "a", 2, 0.2, base=1)),
        ("b", update_bytes(clean, "b", 2, 0.05, base=1)),
        ("a", update_bytes(clean, "a", 3, -0.1, base=2)),
        ("b", update_bytes(clean, "b", 3, 0.3, base=2)),
    ]
    for agent, frame in honest:
        await feed(clean, rec, agent, frame)
    assert clean.core is not None and attacked.core is not None
    cases = corpus(
        attacked.core.weights,
        version=2,
        max_staleness=1,
        replay=honest[2][1],
        replay_agent="a",
        decoder_limit=HOSTILE_LIMIT,
    )
    for agent, frame in honest[:4]:
        await feed(attacked, rec, agent, frame)
    with caplog.at_level(logging.INFO, logger="fedmq.aggregator"):
        for _ in range(2):
            for case in cases:
                await feed(attacked, rec, case.topic_agent, case.payload)
    for agent, frame in honest[4:]:
        await feed(attacked, rec, agent, frame)

    assert attacked.core.version == clean.core.version == 3
    for k, w in clean.core.weights.items():
        assert w.dtype == attacked.core.weights[k].dtype and w.tobytes() == attacked.core.weights[k].tobytes()
    expected = Counter(c.reason.value for c in cases if c.reason is not None)
    replays = expected.pop("duplicate")  # a replay of an accepted update gets its receipt again: no fault
    assert dict(attacked.core.stats.rejected) == {r: 2 * n for r, n in expected.items()}
    assert attacked.core.stats.duplicates == 2 * replays
    assert attacked.core.stats.accepted == clean.core.stats.accepted == 6
    records = [r for r in caplog.records if r.name == "fedmq.aggregator"]
    assert len(records) == len(cases) - replays  # once per (sender, reason), not once per message
    for r in records:
        text = r.getMessage()
        assert MARKER not in text and len(text) < 400, text

    # Bounded memory: another 30 rounds of the corpus allocate nothing that stays.
    for case in cases:  # warm caches (logging, numpy) before measuring
        await feed(attacked, rec, case.topic_agent, case.payload)
    sink = Sink()  # the service's answers are published and forgotten, as by a client
    tracemalloc.start()
    before, _ = tracemalloc.get_traced_memory()
    for _ in range(30):
        for case in cases:
            await feed(attacked, sink, case.topic_agent, case.payload)
    after, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert after - before < 64 * 1024, after - before
    assert peak - before < 4 * HOSTILE_LIMIT, peak - before  # one message at a time, never a blow-up


class Sink(Recorder):
    """Takes every publish and keeps nothing (for measuring what the service itself keeps)."""

    async def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        return None


class SlowRecorder(Recorder):
    """A publish whose PUBACK comes only after every task already waiting to run has run (a slow link):
    the PUBACK is a future the loop completes behind them, so the flushes overlap, whatever the machine."""

    async def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        puback: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(puback.set_result, None)
        await puback
        await super().publish(topic, payload, qos, retain)


async def test_agent_outbox_flushes_running_at_once_send_each_update_once(tmp_path: Path) -> None:
    """The train loop and the resender both flush the outbox; a slow PUBACK must not make them both send."""
    from edge_agent.service import AgentService
    from edge_agent.trainer import LocalTrainer
    from fedmq.config import AgentConfig, PrivacyConfig

    train, _ = digits()
    acfg = AgentConfig(agent_id="pi", state_dir=str(tmp_path))
    trainer = LocalTrainer(acfg, PrivacyConfig(), train.subset(np.arange(20)), rng=np.random.default_rng(0))
    dev = AgentService(replace(Config(prefix="fedmq/seam"), agent=acfg), trainer)
    for seq in (1, 2, 3):
        dev.outbox.put(seq, f"update {seq}".encode())
    rec = SlowRecorder()
    await asyncio.gather(*(dev._flush_outbox(rec) for _ in range(3)))  # type: ignore[arg-type]
    assert [p for _, p, _, _ in rec.published] == [b"update 1", b"update 2", b"update 3"]
    assert dev.stats.updates_published == 3 and dev.stats.resent == 0
    assert sorted(p.name for p in (tmp_path / "pi.outbox").iterdir()) == [f"{s:020d}.update" for s in (1, 2, 3)]


async def test_an_agent_silent_past_the_timeout_counts_offline_and_a_sync_round_goes_on() -> None:
    """A hung device whose MQTT thread still answers pings never triggers its Will: the heartbeat does."""
    now = [1000.0]
    cfg = Config(
        prefix="fedmq/seam",
        aggregator=AggregatorConfig(rule="fedavg", sync_agents=2, agent_timeout=60.0),
    ).validate()
    svc = AggregatorService(cfg, clock=lambda: now[0])
    svc.startup()
    rec = Recorder()
    online = StatusMessage("a", "online").to_bytes(), StatusMessage("b", "online").to_bytes()
    await feed(svc, rec, "a", online[0], kind="status")
    await feed(svc, rec, "b", online[1], kind="status")
    core = svc.core
    assert core is not None and core.selected == ("a", "b")
    await feed(svc, rec, "b", update_bytes(svc, "b", 1, 0.1))  # b delivers; a hangs
    now[0] += 45
    await feed(svc, rec, "b", online[1], kind="status")  # b's heartbeat
    await svc.tick()
    assert core.online == {"a", "b"} and core.version == 0
    now[0] += 30  # a silent for 75 s > 60
    await svc.tick()
    assert core.online == {"b"} and core.version == 1  # the round finished without a
    p = svc.progress()
    assert (p.agents_online, p.agents_offline) == (1, 1)


async def test_model_interval_coalesces_versions_into_one_publish_per_interval() -> None:
    """With aggregator.model_interval, versions made within it go out as one publish of the newest."""
    svc = make_service(model_interval=0.3)
    assert svc.core is not None

    class Client(Recorder):
        def __init__(self) -> None:
            super().__init__()
            self.event = asyncio.Event()

        async def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
            await super().publish(topic, payload, qos, retain)
            self.event.set()

    client = Client()
    task = asyncio.create_task(svc._model_publisher(client))  # type: ignore[arg-type]
    try:
        svc._mark_model_dirty()
        await asyncio.wait_for(client.event.wait(), 5)
        client.event.clear()
        started = asyncio.get_running_loop().time()
        for seq in range(1, 5):  # two FedBuff versions (K=2) within the interval
            await svc.handle(f"fedmq/seam/update/a{seq}", update_bytes(svc, f"a{seq}", 1, 0.01))
        assert svc.core.version == 2 and len(client.models()) == 1
        await asyncio.wait_for(client.event.wait(), 5)
        assert asyncio.get_running_loop().time() - started >= 0.25
        assert [m.version for m in client.models()] == [0, 2]
    finally:
        task.cancel()


@pytest.mark.parametrize("tolerated", [False, True])
async def test_aiomqtts_write_registration_after_a_disconnect_is_not_an_error_in_the_log(
    tolerated: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """aiomqtt queues ``loop.add_writer(fd)`` from paho's callback; when the connection drops
    first, the socket is closed before that runs, and asyncio logged 'Exception in callback ...
    add_writer' with EBADF at ERROR: 30 lines per client at every broker restart. aiomqtt's own
    callback, a real socket closed in between; without the handler the ERROR is there."""
    import socket

    import aiomqtt

    from runtime.transport import tolerate_aiomqtt_disconnect_race

    loop = asyncio.get_running_loop()
    before = loop.get_exception_handler()
    try:
        if tolerated:
            tolerate_aiomqtt_disconnect_race(loop)
        client = aiomqtt.Client("127.0.0.1")
        sock = socket.socket()
        client._on_socket_register_write(client._client, None, sock)  # queues add_writer(sock.fileno())
        sock.close()  # the broker went away first
        with caplog.at_level(logging.DEBUG):
            for _ in range(3):
                await asyncio.sleep(0)  # the loop runs the queued callback
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert bool(errors) is not tolerated, [r.getMessage() for r in errors]
        if tolerated:
            assert any("closed before" in r.getMessage() for r in caplog.records)
            loop.call_exception_handler({"message": "something else", "exception": RuntimeError("x")})
            assert any(r.levelno >= logging.ERROR and "something else" in r.getMessage() for r in caplog.records)
    finally:
        loop.set_exception_handler(before)


async def test_an_update_that_fails_validation_is_answered_with_its_seq_and_why() -> None:
    """A third-party device learns why its update was refused, on its own receipt topic (issue 15)."""
    svc = make_service()
    rec = Recorder()
    obj = msgpack.unpackb(update_bytes(svc, "a", 7, 0.1))
    obj["note"] = "hello"  # a field the strict schema does not know: refused by the decoder
    await feed(svc, rec, "a", msgpack.packb(obj))
    [receipt] = rec.receipts()
    assert (receipt.agent_id, receipt.seq, receipt.status, receipt.reason) == ("a", 7, "rejected", "bad_field")
    assert receipt.detail and "note" in receipt.detail


async def test_a_resend_is_counted_as_a_duplicate_not_a_rejection_and_logs_no_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    svc = make_service()
    rec = Recorder()
    frame = update_bytes(svc, "a", 1, 0.1)
    with caplog.at_level(logging.INFO, logger="fedmq.aggregator"):
        for _ in range(3):
            await feed(svc, rec, "a", frame)
    assert svc.core is not None
    progress = svc.progress()
    assert progress.accepted == 1 and progress.duplicates == 2 and progress.rejected == 0
    assert [r.status for r in rec.receipts()] == ["accepted"] * 3
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
