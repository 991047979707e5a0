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
import itertools
import logging
import os
import secrets
import socket
import time
from collections.abc import Sequence
from typing import Any

import aiomqtt

from aggregator.cluster import ClusterAggregator, decode_state
from aggregator.sharding import Ack, Nak, Offer, Receipt, ShardEffect
from fedmq.config import Config
from fedmq.errors import DecodeError
from fedmq.messages import ModelMessage, ReceiptMessage, UpdateMessage, salvage_seq
from runtime.transport import client_kwargs, publish, subscribe

log = logging.getLogger("fedmq.site")


class SiteAggregator(ClusterAggregator):
    """One site: the root's shard for the devices of one local broker.

    It shares the shard's offers, ticker and commit follower (:class:`ClusterAggregator`);
    what differs is where updates come from and where receipts and models go.
    """

    def __init__(self, config: Config, *, site_id: str | None = None, clock: Any = time.time) -> None:
        site_id = site_id or f"site-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        super().__init__(config, shard_id=site_id, clock=clock)
        self.site_id = site_id
        self.core.min_agents = self.scfg.site_min_devices
        self._tokens = itertools.count(1)
        self._local: asyncio.Queue[tuple[str, bytes, bool]] = asyncio.Queue()

    async def run(self, stop: asyncio.Event | None = None) -> dict[str, Any]:
        """Serve until ``stop``; return a summary."""
        import nats  # the [cluster] extra, checked by the command at startup

        stop = stop or asyncio.Event()
        servers = [u.strip() for u in self.scfg.nats.split(",")]
        self._nc = await nats.connect(servers, name=f"fedmq-{self.site_id}", max_reconnect_attempts=-1)
        try:
            self._js = self._nc.jetstream()
            self._state_kv = await self._retrying(
                "finding the root's state", lambda: self._js.key_value(self.names["state"]), limit=120
            )
            async with aiomqtt.Client(**client_kwargs(self.config.broker)) as local:
                await subscribe(local, self.topics.update_wildcard, qos=1)
                self.ready.set()
                log.info("site %s up: devices on %s, root at %s", self.site_id, self.config.broker.host, servers)
                async with asyncio.TaskGroup() as tg:
                    tasks = [
                        tg.create_task(self._receive(local)),
                        tg.create_task(self._send(local)),
                        tg.create_task(self._offerer()),
                        tg.create_task(self._watch_commits()),
                        tg.create_task(self._ticker()),
                    ]
                    await self._serve_until(stop, tasks)
        finally:
            await self._close_nats()
        return {
            "site": self.site_id,
            "version": self.core.version,
            "accepted": self.core.accepted,
            "forwarded": self.offered,
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
                r = e.receipt
                self._local.put_nowait((self.topics.receipt(r.agent_id), r.to_bytes(), False))
            elif isinstance(e, Offer):
                self._offers.put_nowait(e.partial)
            else:
                assert isinstance(e, Ack | Nak)

    async def _committed(self, version: int) -> None:
        """Relay the committed model to the site's devices (retained on the site's broker)."""
        state, run = decode_state((await self._state_kv.get("state")).value)
        model = ModelMessage(
            version=state.version,
            model=self.spec,
            tensors=state.weights,
            max_staleness=self.cfg.max_staleness,
            run=run,
            created_at=time.time(),
        )
        self._local.put_nowait((self.topics.model, model.to_bytes(), True))

    async def _send(self, local: aiomqtt.Client) -> None:
        """Receipts and models to the site's devices, in order."""
        while True:
            topic, body, retain = await self._local.get()
            await publish(local, topic, body, qos=1, retain=retain)
