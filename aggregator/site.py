"""A site aggregator: a hospital's or a building's devices stay on its own broker; only sums leave.

``fedmq aggregator --site --nats ROOT_URLS --broker mqtt://site-mosquitto``. The site is one
more shard of the root's sharded aggregator (:mod:`aggregator.cluster`), whose updates arrive
over the site's MQTT broker instead of the root's JetStream stream:

* its devices publish to ``{prefix}/update/{id}`` on the site broker, as with any aggregator;
* it checks and sums them with the same :class:`~aggregator.sharding.ShardCore`, and offers
  each partial sum to the root's leader on ``{prefix.}cluster.offer``: the root sees a
  weighted sum of at least ``aggregator.shard.site_min_devices`` (2) devices' updates and the
  keys in it, never one device's update. The site itself sees each update: it is the
  devices' own server (a hospital's), trusted by them; secure aggregation at the site is
  what would hide them from it;
* it follows the root's commit log: when a committed step lists a device's update, the site
  sends the device its ``accepted`` receipt; a partial the root refused, or one lost with the
  site, is simply not receipted, and the device's outbox sends it again (the root's window
  tells a re-sent update that was applied from one that was not: exactly once);
* it republishes each committed model, retained, on the site broker.

The site holds nothing durable of its own: the devices' outboxes are its log. A site that
restarts loses its open partial, and its devices re-send after ``agent.receipt_timeout``.
Secure aggregation inside a site is not combined with this yet (docs/scale-out.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import secrets
import socket
import time
from collections.abc import Sequence
from typing import Any

import aiomqtt

from aggregator.cluster import decode_state, names
from aggregator.sharding import (
    Ack,
    AppliedWindow,
    Nak,
    Offer,
    Partial,
    Receipt,
    Refused,
    ShardCore,
    ShardEffect,
    Taken,
)
from fedmq.codec import DecodeLimits, unpack
from fedmq.config import Config
from fedmq.errors import ConfigError, DecodeError
from fedmq.messages import ModelMessage, ModelSpec, ReceiptMessage, UpdateMessage, salvage_seq
from fedmq.staleness import make_staleness_fn
from models import create_model
from runtime.transport import client_kwargs, publish, subscribe

log = logging.getLogger("fedmq.site")
_STATE_LIMITS = DecodeLimits(max_payload_bytes=64 * 1024 * 1024, max_array_len=10_000_000)


class SiteAggregator:
    """One site: the root's shard for the devices of one local broker."""

    def __init__(self, config: Config, *, site_id: str | None = None, clock: Any = time.time) -> None:
        self.config = config
        self.cfg = config.aggregator
        self.scfg = config.aggregator.shard
        if not self.scfg.nats:
            raise ConfigError("aggregator.shard.nats", "a site needs the root cluster's NATS URLs")
        self.topics = config.topics
        self.names = names(config.prefix)
        self.clock = clock
        self.site_id = site_id or f"site-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.spec = ModelSpec(self.cfg.model, self.cfg.num_features, self.cfg.num_classes, self.cfg.hidden)
        reference = create_model(
            self.cfg.model, num_features=self.cfg.num_features, num_classes=self.cfg.num_classes, hidden=self.cfg.hidden
        ).get_weights()
        self.limits = DecodeLimits(max_payload_bytes=config.broker.max_payload_bytes)
        self.core = ShardCore(
            self.site_id,
            reference,
            version=0,
            staleness=make_staleness_fn(self.cfg.staleness.function, self.cfg.staleness.a, self.cfg.staleness.b),
            max_staleness=self.cfg.max_staleness,
            max_update_norm=self.cfg.max_update_norm,
            max_num_examples=self.cfg.max_num_examples,
            partial_size=self.scfg.partial_for(self.cfg.buffer_size),
            partial_wait=self.scfg.partial_wait,
            min_agents=self.scfg.site_min_devices,
        )
        self.ready = asyncio.Event()
        self.forwarded = 0
        """Partials the root took."""
        self._tokens = itertools.count(1)
        self._offers: asyncio.Queue[Partial] = asyncio.Queue()
        self._receipts: asyncio.Queue[ReceiptMessage] = asyncio.Queue()
        self._models: asyncio.Queue[ModelMessage] = asyncio.Queue()
        self._nc: Any = None

    async def run(self, stop: asyncio.Event | None = None) -> dict[str, Any]:
        """Serve until ``stop``; return a summary."""
        import nats  # the [cluster] extra, checked by the command at startup

        stop = stop or asyncio.Event()
        servers = [u.strip() for u in self.scfg.nats.split(",")]
        self._nc = await nats.connect(servers, name=f"fedmq-{self.site_id}", max_reconnect_attempts=-1)
        try:
            js = self._nc.jetstream()
            async with aiomqtt.Client(**client_kwargs(self.config.broker)) as local:
                await subscribe(local, self.topics.update_wildcard, qos=1)
                self.ready.set()
                log.info("site %s up: devices on %s, root at %s", self.site_id, self.config.broker.host, servers)
                async with asyncio.TaskGroup() as tg:
                    tasks = [
                        tg.create_task(self._receive(local)),
                        tg.create_task(self._send(local)),
                        tg.create_task(self._offerer()),
                        tg.create_task(self._follow(js)),
                        tg.create_task(self._ticker()),
                    ]
                    await stop.wait()
                    self._carry(self.core.flush())
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(2 * self.scfg.lease):
                            await self._offers.join()
                    for t in tasks:
                        t.cancel()
        finally:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await self._nc.close()
        return {
            "site": self.site_id,
            "version": self.core.version,
            "accepted": self.core.accepted,
            "forwarded": self.forwarded,
            "rejected": self.core.rejected,
        }

    async def _receive(self, local: aiomqtt.Client) -> None:
        async for msg in local.messages:
            agent = self.topics.agent_of(msg.topic.value, "update")
            payload = bytes(msg.payload) if isinstance(msg.payload, (bytes, bytearray)) else b""
            if agent is None:
                continue
            token = next(self._tokens)
            try:
                update = UpdateMessage.from_bytes(payload, self.limits)
            except DecodeError as exc:
                seq = salvage_seq(payload, self.limits) or 0
                self._carry([Receipt(ReceiptMessage(agent, seq, "rejected", self.core.version, exc.reason))])
                continue
            self._carry(self.core.update(token, update, topic_agent=agent, now=self.clock()))

    def _carry(self, effects: Sequence[ShardEffect]) -> None:
        """Acks and naks need nothing here: the device's outbox re-sends what is not receipted."""
        for e in effects:
            if isinstance(e, Receipt):
                self._receipts.put_nowait(e.receipt)
            elif isinstance(e, Offer):
                self._offers.put_nowait(e.partial)
            else:
                assert isinstance(e, Ack | Nak)

    async def _send(self, local: aiomqtt.Client) -> None:
        """Receipts and models to the site's devices, in order."""

        async def receipts() -> None:
            while True:
                r = await self._receipts.get()
                await publish(local, self.topics.receipt(r.agent_id), r.to_bytes(), qos=1)

        async def models() -> None:
            while True:
                m = await self._models.get()
                await publish(local, self.topics.model, m.to_bytes(), qos=1, retain=True)

        async with asyncio.TaskGroup() as tg:
            tg.create_task(receipts())
            tg.create_task(models())

    async def _offerer(self) -> None:
        from nats.errors import Error as NatsError

        while True:
            partial = await self._offers.get()
            try:
                reply = await self._nc.request(self.names["offer"], partial.to_bytes(), timeout=self.scfg.lease)
            except NatsError:
                self._offers.task_done()
                continue  # no leader now: offered again by the ticker
            self._offers.task_done()
            answer = unpack(reply.data)
            if answer.get("status") == "taken":
                self.forwarded += 1
                self._carry(self.core.answer(Taken(partial.shard, partial.pid)))
            else:
                dups = tuple((str(a), int(s)) for a, s in answer.get("duplicates", []))
                self._carry(self.core.answer(Refused(partial.shard, partial.pid, str(answer.get("reason")), dups)))

    async def _ticker(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.2)  # a clock for partial_wait, not a wait for an event
            self._carry(self.core.due(self.clock()))
            if time.monotonic() - last >= self.scfg.lease:
                last = time.monotonic()
                if self._offers.empty():
                    self._carry(self.core.new_leader())

    async def _follow(self, js: Any) -> None:
        """The root's commit log: settle receipts; the committed model goes to the site's devices."""
        from nats.errors import Error as NatsError
        from nats.js.api import DeliverPolicy

        seen = -1
        window = AppliedWindow(self.cfg.max_agents)
        while True:
            try:
                kv = await js.key_value(self.names["state"])
                sub = await js.subscribe(self.names["commit"], ordered_consumer=True, deliver_policy=DeliverPolicy.LAST)
                async for msg in sub.messages:
                    obj = unpack(msg.data, _STATE_LIMITS)
                    version = int(obj["version"])
                    if version <= seen:
                        continue
                    entry = await kv.get("state")
                    state, run = decode_state(entry.value)
                    if version != seen + 1 or state.version != version:
                        seen, window = state.version, state.window  # a gap, or the state moved on: take it whole
                    else:
                        window.add([(str(a), int(q)) for a, q in obj["keys"]], version)
                        seen = version
                    self._carry(self.core.commit(seen, window))
                    self._models.put_nowait(
                        ModelMessage(
                            version=state.version,
                            model=self.spec,
                            tensors=state.weights,
                            max_staleness=self.cfg.max_staleness,
                            run=run,
                            created_at=time.time(),
                        )
                    )
            except NatsError as exc:
                log.warning("following the root's commits failed (%s); following again", exc or type(exc).__name__)
                await asyncio.sleep(1.0)  # a back-off, not a wait for an event
