"""Fleet scale: thousands of simulated devices on one event loop against one broker and aggregator.

Each simulated device is one MQTT connection (:class:`simulator.mqtt_lite.LiteConnection`)
with its own client id, Will and retained ``online`` status, subscribed to the global model
and to its own receipts, exactly as ``fedmq agent`` is. It does not train: it sends a valid
update (a fixed small delta, its own agent id and seq, based on the newest model it received)
at heavy-tailed random intervals, so the broker and the aggregator see a real fleet's
traffic (updates and status heartbeats) while this process stays cheap. Everything runs on one event loop: one scheduler
task drives every device's releases and keepalives (a heap of due times), and connections
have no task, timer or thread of their own.

Measured: connect time of the whole fleet (CONNECT, CONNACK, SUBSCRIBE, retained model,
online status), then over a steady window the updates/s, the latency from publish to the
aggregator's receipt (percentiles), and the aggregator's and broker's CPU and memory.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import math
import random
import statistics
import time
from dataclasses import dataclass, field

import numpy as np

from fedmq.messages import ModelMessage, ReceiptMessage, StatusMessage, UpdateMessage
from fedmq.topics import Topics
from simulator.mqtt_lite import LiteConnection, MQTTLiteError


@dataclass(frozen=True)
class FleetConfig:
    """One fleet run."""

    agents: int = 10_000
    interval: float = 30.0
    """Mean seconds between one device's updates (log-normal, sigma ``sigma``)."""
    sigma: float = 1.0
    steady: float = 60.0
    """Seconds of steady traffic measured after the whole fleet is connected."""
    heartbeat: float = 15.0
    """Seconds between a device's status heartbeats (retained ``online``), as ``fedmq agent`` sends."""
    connect_concurrency: int = 200
    prefix: str = "fedmq/fleet"
    keepalive: int = 600
    seed: int = 0

    def validate(self) -> FleetConfig:
        """Raise ValueError on nonsense parameters."""
        if self.agents < 1 or self.interval <= 0 or self.steady <= 0 or self.connect_concurrency < 1:
            raise ValueError("fleet: need agents >= 1, interval > 0, steady > 0, connect_concurrency >= 1")
        if self.heartbeat <= 0:
            raise ValueError("fleet: heartbeat must be > 0 seconds")
        return self


@dataclass
class _Device:
    agent_id: str
    conn: LiteConnection | None = None
    version: int = -1
    seq: int = 0
    sent: dict[int, float] = field(default_factory=dict)
    payloads: dict[int, bytes] = field(default_factory=dict)
    """Updates without a final receipt yet (a ``retry`` receipt sends one again later)."""


class Fleet:
    """Many simulated devices on this event loop (see the module docstring)."""

    def __init__(self, cfg: FleetConfig, host: str, port: int, delta: dict[str, np.ndarray]) -> None:
        self.cfg = cfg.validate()
        self.host, self.port = host, port
        self.topics = Topics(cfg.prefix)
        self.delta = delta
        self.devices = {f"f{i:05d}": _Device(f"f{i:05d}") for i in range(cfg.agents)}
        self.rng = random.Random(cfg.seed)
        self.latencies: list[float] = []
        self.accepted = 0
        self.rejected: dict[str, int] = {}
        self.updates_sent = 0
        self.retries = 0
        """``retry`` receipts (rate limit, one update per agent per buffer): sent again when due."""
        self.heartbeats = 0
        self.models_received = 0
        self._model_cache: tuple[bytes, int] | None = None
        self.measuring = False
        self.receipted = asyncio.Event()
        """Set whenever a receipt arrives (for waiting on readiness, not on time)."""

    # -- incoming ----------------------------------------------------------------------------
    def _on_publish(self, conn: LiteConnection, topic: str, payload: bytes) -> None:
        dev = self.devices[conn.client_id]
        if topic == self.topics.model:
            self.models_received += 1
            # Every device gets the same bytes: decode each distinct model once.
            cached = self._model_cache
            if cached is None or cached[0] != payload:
                cached = self._model_cache = (payload, ModelMessage.from_bytes(payload).version)
            dev.version = cached[1]
            return
        receipt = ReceiptMessage.from_bytes(payload)
        self.receipted.set()
        if receipt.status == "retry":  # as fedmq agent does: keep it, send it again when told
            again = dev.payloads.get(receipt.seq)
            if again is not None and dev.conn is not None:
                self.retries += 1
                conn, topic = dev.conn, self.topics.update(dev.agent_id)
                resend = functools.partial(conn.publish, topic, again, qos=1)
                asyncio.get_running_loop().call_later(receipt.retry_after or 1.0, resend)
            return
        dev.payloads.pop(receipt.seq, None)
        sent_at = dev.sent.pop(receipt.seq, None)
        if sent_at is None or not self.measuring:
            return
        if receipt.status == "accepted":
            self.accepted += 1
            self.latencies.append(time.monotonic() - sent_at)
        else:
            reason = str(receipt.reason)
            self.rejected[reason] = self.rejected.get(reason, 0) + 1

    # -- lifecycle ---------------------------------------------------------------------------
    async def connect_all(self) -> tuple[float, int]:
        """Connect every device through a pool of ``connect_concurrency`` workers.

        Returns the seconds it took and how many devices failed to connect (each failure is
        counted, not fatal: the point is to find where the machine stops).
        """
        loop = asyncio.get_running_loop()
        pending = iter(list(self.devices.values()))
        failed = 0
        t0 = time.monotonic()

        async def worker() -> None:
            nonlocal failed
            for dev in pending:  # the workers share one iterator
                try:
                    _, conn = await loop.create_connection(
                        lambda dev=dev: LiteConnection(dev.agent_id, self._on_publish),  # type: ignore[misc]
                        self.host,
                        self.port,
                    )
                    offline = StatusMessage(dev.agent_id, "offline").to_bytes()
                    will = (self.topics.status(dev.agent_id), offline, True)
                    await asyncio.wait_for(conn.connect(keepalive=self.cfg.keepalive, will=will), 30)
                    subs = [(self.topics.model, 0), (self.topics.receipt(dev.agent_id), 0)]
                    await asyncio.wait_for(conn.subscribe(subs), 30)
                except (OSError, MQTTLiteError, TimeoutError):
                    failed += 1
                    continue
                online = StatusMessage(dev.agent_id, "online", ts=time.time()).to_bytes()
                conn.publish(self.topics.status(dev.agent_id), online, qos=1, retain=True)
                dev.conn = conn

        async with asyncio.TaskGroup() as tg:
            for _ in range(min(self.cfg.connect_concurrency, len(self.devices))):
                tg.create_task(worker())
        return time.monotonic() - t0, failed

    async def run_traffic(self, seconds: float, stop: asyncio.Event | None = None) -> None:
        """Send each device's updates on its own heavy-tailed schedule for ``seconds``."""
        cfg = self.cfg
        mu = math.log(cfg.interval) - cfg.sigma**2 / 2  # mean of the log-normal == interval
        now = time.monotonic()
        # One heap for the whole fleet: (due time, what, device); what 0 = update, 1 = heartbeat.
        heap = [(now + self.rng.uniform(0, cfg.interval), 0, d.agent_id) for d in self.devices.values()]
        heap += [(now + self.rng.uniform(0, cfg.heartbeat), 1, d.agent_id) for d in self.devices.values()]
        heapq.heapify(heap)
        end = now + seconds
        last_ping = now
        while time.monotonic() < end and not (stop and stop.is_set()):
            now = time.monotonic()
            while heap and heap[0][0] <= now:
                _, what, agent = heapq.heappop(heap)
                if what == 0:
                    self._release(self.devices[agent], now)
                    heapq.heappush(heap, (now + self.rng.lognormvariate(mu, cfg.sigma), 0, agent))
                else:
                    self._heartbeat(self.devices[agent])
                    heapq.heappush(heap, (now + cfg.heartbeat, 1, agent))
            if now - last_ping > cfg.keepalive / 2:
                for d in self.devices.values():
                    if d.conn is not None:
                        d.conn.ping()
                last_ping = now
            wait = min(end, heap[0][0] if heap else end) - time.monotonic()
            await asyncio.sleep(max(0.0, min(wait, 0.05)))

    def _heartbeat(self, dev: _Device) -> None:
        if dev.conn is not None:
            online = StatusMessage(dev.agent_id, "online", seq=dev.seq, ts=time.time()).to_bytes()
            dev.conn.publish(self.topics.status(dev.agent_id), online, qos=1, retain=True)
            self.heartbeats += 1

    def _release(self, dev: _Device, now: float) -> None:
        if dev.conn is None or dev.version < 0:
            return
        dev.seq += 1
        msg = UpdateMessage(dev.agent_id, dev.seq, dev.version, 8, self.delta, sent_at=time.time())
        payload = msg.to_bytes()
        dev.conn.publish(self.topics.update(dev.agent_id), payload, qos=1)
        dev.payloads[dev.seq] = payload
        dev.sent[dev.seq] = now
        self.updates_sent += 1

    def close(self) -> None:
        """Disconnect every device."""
        for d in self.devices.values():
            if d.conn is not None:
                d.conn.close()


def percentiles(values: list[float]) -> dict[str, float]:
    """p50/p90/p99/max in milliseconds."""
    if not values:
        return {}
    xs = sorted(values)

    def q(p: float) -> float:
        return 1000 * xs[min(len(xs) - 1, int(p * len(xs)))]

    return {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": 1000 * xs[-1], "mean": 1000 * statistics.fmean(xs)}


__all__ = ["Fleet", "FleetConfig", "percentiles"]
