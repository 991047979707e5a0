"""The fleet simulator's MQTT connection (seams: fragmented and coalesced frames) and a small fleet
against a real Mosquitto and aggregator."""

from __future__ import annotations

import asyncio
import struct
from dataclasses import replace

import numpy as np
import pytest

from broker.launcher import MosquittoBroker
from fedmq.config import AggregatorConfig, BrokerConfig, Config
from simulator.fleet import Fleet, FleetConfig, percentiles
from simulator.mqtt_lite import LiteConnection, MQTTLiteError, _packet, _str
from tests.helpers import start_aggregator, wait_until


def _publish(topic: str, payload: bytes, qos: int = 0, pid: int = 7) -> bytes:
    body = _str(topic) + (struct.pack(">H", pid) if qos else b"") + payload
    return _packet(0x30 | (qos << 1), body)


class _Sink:
    def __init__(self) -> None:
        self.got: list[tuple[str, bytes]] = []
        self.sent = bytearray()

    def write(self, data: bytes) -> None:
        self.sent += data

    def is_closing(self) -> bool:
        return False


async def _conn() -> tuple[LiteConnection, _Sink]:
    sink = _Sink()
    conn = LiteConnection("c1", lambda c, t, p: sink.got.append((t, p)))
    conn.transport = sink  # type: ignore[assignment]
    return conn, sink


async def test_frames_split_at_every_byte_or_coalesced_parse_the_same() -> None:
    big = bytes(range(256)) * 600  # remaining length needs 3 bytes
    stream = _publish("a/b", b"x") + _publish("m", big, qos=1, pid=300) + _publish("c", b"")
    for chunk in (1, 2, 7, 127, len(stream)):
        conn, sink = await _conn()
        for i in range(0, len(stream), chunk):
            conn.data_received(stream[i : i + chunk])
        assert sink.got == [("a/b", b"x"), ("m", big), ("c", b"")]
        assert bytes(sink.sent) == b"\x40\x02" + struct.pack(">H", 300)  # the QoS-1 publish was acknowledged


async def test_a_refused_connack_and_a_lost_connection_fail_the_waiters() -> None:
    conn, _ = await _conn()
    conn.data_received(b"\x20\x02\x00\x05")  # CONNACK: not authorized
    with pytest.raises(MQTTLiteError, match="return code 5"):
        await conn.connack
    conn, _ = await _conn()
    sub = conn.subscribe([("t", 0)])
    conn.connection_lost(None)
    with pytest.raises(MQTTLiteError, match="connection lost"):
        await sub


async def test_a_small_fleet_on_one_loop_is_online_and_its_updates_are_receipted(
    mosquitto: MosquittoBroker, prefix: str
) -> None:
    agg = replace(AggregatorConfig(rule="fedbuff", buffer_size=5, metrics_interval=0.2), max_staleness=10_000)
    cfg = Config(prefix=prefix, broker=BrokerConfig(host=mosquitto.host, port=mosquitto.port), aggregator=agg)
    server, stop, task = await start_aggregator(cfg.validate())
    assert server.core is not None
    delta = {k: np.full(v.shape, 0.001, np.float32) for k, v in server.core.weights.items()}
    fleet = Fleet(
        FleetConfig(agents=40, interval=0.5, steady=1, prefix=prefix, connect_concurrency=8),
        mosquitto.host,
        mosquitto.port,
        delta,
    )
    try:
        _, failed = await fleet.connect_all()
        assert failed == 0
        await wait_until(server.pulse, lambda: len(server.core.online) == 40)  # type: ignore[union-attr]
        fleet.measuring = True
        await fleet.run_traffic(3.0)
        await wait_until(server.pulse, lambda: server.core.stats.accepted >= fleet.updates_sent)  # type: ignore[union-attr]
        async with asyncio.timeout(10):
            while fleet.accepted < fleet.updates_sent:
                await fleet.receipted.wait()
                fleet.receipted.clear()
    finally:
        fleet.close()
        stop.set()
        await task
    assert fleet.updates_sent >= 40 and fleet.rejected == {}
    assert server.core.version >= fleet.updates_sent // 5
    lat = percentiles(fleet.latencies)
    assert 0 < lat["p50"] <= lat["p99"] <= lat["max"]
