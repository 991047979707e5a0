"""Tier 3: the hostile corpus through a real Mosquitto into a running aggregator.

The broker runs the project's dev config with its packet limit lowered to 1 MiB (so "above
the broker limit" costs 1 MiB, not 128), and the aggregator's decoder limit is 256 KiB.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import pytest

from broker.launcher import DEV_CONF, MosquittoBroker
from fedmq.config import AggregatorConfig, BrokerConfig, Config
from fedmq.messages import UpdateMessage, metrics_from_bytes
from tests.conftest import require_mosquitto
from tests.helpers import payload, start_aggregator, wait_for_message, wait_until
from tests.hostile import MARKER, Hostile, corpus

pytestmark = pytest.mark.broker
BROKER_LIMIT = 1024 * 1024
DECODER_LIMIT = 256 * 1024


@pytest.fixture(scope="module")
def small_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    require_mosquitto()
    work = tmp_path_factory.mktemp("hostile-broker")
    broker = dev_broker_with(work, max_packet_size=BROKER_LIMIT)
    broker.start()
    yield broker
    broker.stop()


def dev_broker_with(work: Path, **directives: int) -> MosquittoBroker:
    """A Mosquitto on the project's dev config with some directives set to other values."""
    lines = DEV_CONF.read_text().splitlines()
    for name, value in directives.items():
        assert any(line.startswith(f"{name} ") for line in lines), f"{name} is not in {DEV_CONF}"
        lines = [f"{name} {value}" if line.startswith(f"{name} ") else line for line in lines]
    template = work / "mosquitto.template.conf"
    template.write_text("\n".join(lines) + "\n")
    return MosquittoBroker(conf=template, workdir=work / "run")


def honest_frames(weights: dict[str, Any]) -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(7)
    out = []
    for seq, base in ((1, 0), (2, 1), (3, 2)):
        for agent in ("alice", "bob"):
            delta = {k: rng.normal(0, 0.05, v.shape).astype(v.dtype) for k, v in weights.items()}
            u = UpdateMessage(agent_id=agent, seq=seq, base_version=base, num_examples=10, delta=delta)
            out.append((agent, u.to_bytes()))
    return out


async def run(broker: MosquittoBroker, prefix: str, *, attack: bool) -> tuple[dict[str, Any], dict[str, Any], int]:
    cfg = Config(
        prefix=prefix,
        broker=BrokerConfig(host=broker.host, port=broker.port, max_payload_bytes=DECODER_LIMIT),
        aggregator=AggregatorConfig(rule="fedbuff", buffer_size=2, max_staleness=1, metrics_interval=0.1),
    ).validate()
    server, stop, task = await start_aggregator(cfg)
    core = server.core
    assert core is not None
    topics = server.topics
    frames = honest_frames(dict(core.weights))
    cases: list[Hostile] = []
    async with aiomqtt.Client(broker.host, broker.port) as pub:
        for agent, frame in frames[:4]:
            await pub.publish(topics.update(agent), frame, qos=1)
        await wait_until(server.pulse, lambda: core.version == 2)
        if attack:
            cases = corpus(
                core.weights,
                version=2,
                max_staleness=1,
                replay=frames[2][1],
                replay_agent="alice",
                decoder_limit=DECODER_LIMIT,
                broker_limit=BROKER_LIMIT,
            )
            for _ in range(2):
                for case in cases:
                    if case.stage == "broker":
                        await publish_refused_by_broker(broker, topics.update(case.topic_agent), case.payload)
                    else:
                        await pub.publish(topics.update(case.topic_agent), case.payload, qos=1)
            # A replay of an accepted update is answered with its receipt and counted apart (duplicates).
            refused = 2 * sum(1 for c in cases if c.reason is not None and c.reason.value != "duplicate")
            replayed = 2 * sum(1 for c in cases if c.reason is not None and c.reason.value == "duplicate")
            await wait_until(
                server.pulse,
                lambda: sum(core.stats.rejected.values()) == refused and core.stats.duplicates == replayed,
            )
        for agent, frame in frames[4:]:
            await pub.publish(topics.update(agent), frame, qos=1)
        await wait_until(server.pulse, lambda: core.version == 3)
    expected = Counter(c.reason.value for c in cases if c.reason is not None and c.reason.value != "duplicate")
    metrics = await wait_for_message(
        broker.host,
        broker.port,
        topics.metrics,
        lambda m: metrics_from_bytes(payload(m))["version"] == 3,
    )
    reported = metrics_from_bytes(payload(metrics))["rejected_by_reason"]
    assert reported == {r: 2 * n for r, n in expected.items()}
    stop.set()
    await task
    return dict(core.weights), reported, len(cases)


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


async def publish_refused_by_broker(broker: MosquittoBroker, topic: str, data: bytes) -> None:
    """Mosquitto closes the connection of a client whose packet exceeds max_packet_size.

    Raw MQTT 3.1.1 frames, because aiomqtt reports a connection closed mid-publish only at
    its timeout: CONNECT, check the CONNACK, then one QoS 0 PUBLISH; the broker hangs up.
    """
    assert len(data) > BROKER_LIMIT
    reader, writer = await asyncio.open_connection(broker.host, broker.port)
    try:
        writer.write(bytes.fromhex("100d00044d5154540402003c000178"))
        assert await reader.readexactly(4) == bytes.fromhex("20020000")
        name = topic.encode()
        body = len(name).to_bytes(2, "big") + name + data
        with contextlib.suppress(ConnectionError):
            writer.write(b"\x30" + _remaining_length(len(body)) + body)
            await writer.drain()
        async with asyncio.timeout(10):
            try:
                answer = await reader.read()
            except ConnectionError:  # reset while our bytes were still arriving: also a hang-up
                answer = b""
        assert answer == b"", "the broker accepted a packet above its limit"
    finally:
        writer.close()


async def test_hostile_corpus_through_the_broker_is_refused_counted_and_changes_nothing(
    small_broker: MosquittoBroker, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    clean, none_rejected, _ = await run(small_broker, "fedmq/hostile-clean", attack=False)
    assert none_rejected == {}
    with caplog.at_level(logging.INFO, logger="fedmq.aggregator"):
        attacked, rejected, n_cases = await run(small_broker, "fedmq/hostile-attacked", attack=True)
    assert clean.keys() == attacked.keys()
    for k in clean:  # the global model is bit-identical to the run without hostile messages
        assert clean[k].dtype == attacked[k].dtype and clean[k].tobytes() == attacked[k].tobytes(), k
    # All but the broker-refused one and the replay (answered with its receipt), twice each.
    assert sum(rejected.values()) == 2 * (n_cases - 2)
    rejections = [r.getMessage() for r in caplog.records if "rejected an update" in r.getMessage()]
    assert len(rejections) == n_cases - 2  # each logged once, the repeat only counted
    # A stale update is what a slow honest device sends: INFO. Every other refusal is a WARNING.
    for r in caplog.records:
        if "rejected an update" in r.getMessage():
            stale = ": too_stale (" in r.getMessage()
            assert r.levelno == (logging.INFO if stale else logging.WARNING), r.getMessage()
    assert not any(MARKER in text for text in caplog.messages)


async def test_the_brokers_queue_limit_for_an_offline_aggregator_drops_silently(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Mosquitto queues QoS 1 messages for the aggregator's persistent session while it is away,
    up to max_queued_messages, and drops the rest silently. The limit is the deployment's to size
    (broker/mosquitto.conf: 1000 messages / 4 GiB); this pins the behaviour with a limit of 5.
    What is dropped has no receipt, so real agents re-send it (tests/test_chaos.py)."""
    require_mosquitto()
    work = tmp_path_factory.mktemp("queue-limit")
    broker = dev_broker_with(work, max_queued_messages=5)
    broker.start()
    try:
        cfg = Config(
            prefix="fedmq/queue",
            broker=BrokerConfig(host=broker.host, port=broker.port),
            aggregator=AggregatorConfig(rule="fedbuff", buffer_size=100, metrics_interval=0.1),
        ).validate()
        first, stop, task = await start_aggregator(cfg)
        assert first.core is not None
        weights = dict(first.core.weights)
        stop.set()
        await task  # a clean stop: the persistent session stays on the broker
        async with aiomqtt.Client(broker.host, broker.port) as dev:
            for i in range(12):
                delta = {k: np.zeros_like(v) for k, v in weights.items()}
                u = UpdateMessage(agent_id=f"d{i}", seq=1, base_version=0, num_examples=1, delta=delta)
                await dev.publish(f"fedmq/queue/update/d{i}", u.to_bytes(), qos=1)
        second, stop2, task2 = await start_aggregator(cfg)
        assert second.core is not None
        await wait_until(second.pulse, lambda: second.core.stats.accepted >= 5)  # type: ignore[union-attr]
        # Nothing more comes. A marker update published now reaches the aggregator after the queued
        # ones (Mosquitto delivers a session's queue first); once it is in, the queue is done.
        async with aiomqtt.Client(broker.host, broker.port) as dev:
            delta = {k: np.zeros_like(v) for k, v in weights.items()}
            marker = UpdateMessage(agent_id="marker", seq=1, base_version=0, num_examples=1, delta=delta)
            await dev.publish("fedmq/queue/update/marker", marker.to_bytes(), qos=1)
        await wait_until(second.pulse, lambda: "marker" in second.core.last_seq)  # type: ignore[union-attr]
        assert second.core.stats.accepted == 5 + 1  # 12 sent while away, 5 queued, 7 dropped silently
        stop2.set()
        await task2
    finally:
        broker.stop()


async def test_an_update_on_a_topic_whose_id_is_not_valid_is_counted(
    small_broker: MosquittoBroker, prefix: str
) -> None:
    cfg = Config(prefix=prefix, broker=BrokerConfig(host=small_broker.host, port=small_broker.port)).validate()
    server, stop, task = await start_aggregator(cfg)
    assert server.core is not None
    async with aiomqtt.Client(small_broker.host, small_broker.port) as c:
        for bad in ("x" * 65, "server", "a b", "é"):
            await c.publish(f"{prefix}/update/{bad}", b"\xc1", qos=1)
        await c.publish(f"{prefix}/update/marker", b"\xc1", qos=1)  # a valid id: malformed, and last
        await wait_until(server.pulse, lambda: server.core.stats.rejected.get("malformed", 0) == 1)  # type: ignore[union-attr]
    assert dict(server.core.stats.rejected) == {"malformed": 1, "bad_topic": 4}
    stop.set()
    await task
