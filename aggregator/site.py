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

**Secure aggregation inside the site** (``aggregator.secure_aggregation``): the site serves
SecAgg+ cohorts to its devices (:class:`~aggregator.site_cohorts.SiteCohorts`, as a site over
MQTT does), takes no plain update, and offers each cohort's sum as its next partial: neither the
site nor the root sees one device's update. Contributors are receipted from the commit that
holds the sum; the other members get a ``DoneMsg``, and all of them ``abandoned`` if the root
refuses the sum for good (they keep their updates for a later cohort). A cohort's sum lost with
the site is not receipted: its devices send their updates again. Unmasking runs on the event
loop.

**Distributed DP inside the site** (``aggregator.secagg.dp_epsilon``, with ``max_participation``):
the cohorts announce the noise calibrated for the model (:func:`~aggregator.cohorts.with_distributed_dp`,
as the aggregator and a site over MQTT do), each device noises its update before masking, and a
sum leaves as a DP release. The devices' ledger is the one durable thing the site keeps: in the
cluster's ``ledgers`` bucket (replicated as the root's state), under the site's stable id
(``aggregator.uplink.site_id``, required). A sum's charge is written there, by compare-and-set,
before the sum is offered to the root, so a restarted site finds every charge (it may find one
for a sum that never left: an over-count, never an under-count). Two processes serving one site
id would each overwrite the other's charges: the second one's write fails its compare-and-set and
that process stops with :class:`LedgerConflict`, before its sum leaves.
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
from aggregator.cohorts import cohort_settings, federation_verifier, with_distributed_dp
from aggregator.privacy import FederationLedger
from aggregator.sharding import Ack, Nak, Offer, Partial, Receipt, Settled, ShardEffect
from aggregator.site_cohorts import CohortEffect, SendSecAgg, SiteCohorts, device_input
from fedmq.codec import pack, unpack
from fedmq.config import Config
from fedmq.errors import DecodeError, RejectReason
from fedmq.messages import ModelMessage, ReceiptMessage, UpdateMessage, salvage_seq
from fedmq.secagg.messages import Params
from fedmq.secagg.server import CohortManager
from runtime.transport import client_kwargs, publish, subscribe

log = logging.getLogger("fedmq.site")


class LedgerConflict(RuntimeError):
    """Another process wrote this site's privacy ledger: two processes serve one ``aggregator.uplink.site_id``."""


class SiteAggregator(ClusterAggregator):
    """One site: the root's shard for the devices of one local broker.

    It shares the shard's offers, ticker and commit follower (:class:`ClusterAggregator`);
    what differs is where updates come from and where receipts and models go.
    """

    def __init__(self, config: Config, *, site_id: str | None = None, clock: Any = time.time) -> None:
        stable = config.aggregator.uplink.site_id
        # A shard id of its own per process (the root tells partials apart by it), named after the site.
        site_id = site_id or f"{stable or 'site'}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        super().__init__(config, shard_id=site_id, clock=clock)
        self.site_id = site_id
        self.ledger_key = stable
        """Where this site's privacy ledger lives in the cluster's ``ledgers`` bucket (distributed DP)."""
        self.core.min_agents = self.scfg.site_min_devices
        self._tokens = itertools.count(1)
        self._local: asyncio.Queue[tuple[str, bytes, bool]] = asyncio.Queue()
        self.secure: SiteCohorts | None = None
        self._cohort_params: Params | None = None
        """What the relayed model announces to the devices: this site's cohorts."""
        self.ledger: FederationLedger | None = None
        """Under distributed DP: the devices' releases; durable in the cluster before each sum leaves."""
        self._ledger_kv: Any = None
        self._ledger_revision = 0
        """The ledger's revision in the bucket as this process last read or wrote it (0: none yet)."""
        self._unsaved = False
        """Charges made since the ledger was last snapshotted for the bucket (a sum offered now must wait)."""
        if self.cfg.secure_aggregation:
            n_params = sum(v.size for v in self.initial.values())
            settings = with_distributed_dp(self.cfg, cohort_settings(self.cfg), n_params)
            cohorts = CohortManager(settings, n_values=n_params + 1, verifier=federation_verifier(config.broker))
            if self.cfg.secagg.dp_epsilon is not None:
                self.ledger = FederationLedger(self.cfg.dp_delta)
            self.secure = SiteCohorts(
                self.core,
                cohorts,
                ledger=self.ledger,
                max_participation=self.cfg.max_participation if self.ledger is not None else 0,
                min_separation=self.cfg.min_separation if self.ledger is not None else 0,
            )
            self._cohort_params = settings.params
        self._run: str | None = None
        """The root's federation run (from its committed state): cohorts are announced for it."""

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
            if self.ledger is not None:
                await self._retrying("reading the privacy ledger", self._load_ledger, limit=120)
            async with aiomqtt.Client(**client_kwargs(self.config.broker)) as local:
                await subscribe(local, self.topics.update_wildcard, qos=1)
                if self.secure is not None:
                    await subscribe(local, self.topics.secagg_up_wildcard, qos=1)
                    await subscribe(local, self.topics.status_wildcard, qos=1)
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
                    if self.secure is not None:
                        tasks.append(tg.create_task(self._cohort_ticker()))
                    await self._serve_until(stop, tasks)
        finally:
            await self._close_nats()
        return {
            "site": self.site_id,
            "version": self.core.version,
            "accepted": self.core.accepted,
            "forwarded": self.offered,
            "rejected": self.core.rejected,
            **(self.secure.stats() if self.secure is not None else {}),
        }

    async def _receive(self, local: aiomqtt.Client) -> None:
        async for msg in local.messages:
            payload = bytes(msg.payload) if isinstance(msg.payload, (bytes, bytearray)) else b""
            if self.secure is not None and self._device_protocol(msg.topic.value, payload):
                continue
            agent = self.topics.agent_of(msg.topic.value, "update")
            if agent is None:
                continue
            if self.secure is not None:
                seq = salvage_seq(payload, self.limits) or 0
                why = "this site takes only masked updates (secure aggregation); the update was not looked at"
                reason = RejectReason.SECURE_AGGREGATION_REQUIRED.value
                self._carry([Receipt(ReceiptMessage(agent, seq, "rejected", self.core.version, reason, detail=why))])
                continue
            token = next(self._tokens)
            try:
                update = UpdateMessage.from_bytes(payload, self.limits)
            except DecodeError as exc:
                seq = salvage_seq(payload, self.limits) or 0
                self._carry([Receipt(ReceiptMessage(agent, seq, "rejected", self.core.version, exc.reason))])
                continue
            self._carry(self.core.update(token, update, topic_agent=agent, now=self.clock()))

    def _device_protocol(self, topic: str, body: bytes) -> bool:
        """A secure-aggregation message or a status from a device (decided now); False for anything else."""
        assert self.secure is not None
        got = device_input(self.topics, topic, body, self.limits)
        if got is None:
            return False
        if got.error is not None:
            log.info("site %s: undecodable secure-aggregation message from %s: %s", self.site_id, got.agent, got.error)
        elif got.message is not None:
            capped = len(self.secure.capped)
            self._carry(self.secure.message(got.agent, got.message, now=self.clock(), run=self._run))
            if len(self.secure.capped) > capped:  # once per device: it checks in again and again
                log.info(
                    "site %s: %s joins no more cohorts: it is in %d released sums (aggregator.max_participation)",
                    self.site_id, got.agent, self.ledger.count(got.agent) if self.ledger is not None else 0,
                )  # fmt: skip
        elif got.offline:
            self._carry(self.secure.offline(got.agent, now=self.clock()))
        return True

    async def _cohort_ticker(self) -> None:
        """Round timeouts, and cohorts formed after ``form_wait``."""
        assert self.secure is not None
        while True:
            await asyncio.sleep(0.25)  # a clock for the cohorts' timeouts, not a wait for an event
            self._carry(self.secure.tick(self.clock(), run=self._run))

    def _carry(self, effects: Sequence[ShardEffect | CohortEffect]) -> None:
        """Acks and naks need nothing here: the device's outbox re-sends what is not receipted."""
        receipted: set[str] = set()
        for e in effects:
            if isinstance(e, Receipt):
                r = e.receipt
                receipted.add(r.agent_id)
                self._local.put_nowait((self.topics.receipt(r.agent_id), r.to_bytes(), False))
            elif isinstance(e, Offer):
                if self.ledger is not None:  # its charge goes to the cluster before it leaves (_before_offer)
                    self._unsaved = True
                self._offers.put_nowait(e.partial)
            elif isinstance(e, SendSecAgg):
                self._local.put_nowait((self.topics.secagg_down(e.agent), e.payload, False))
            elif isinstance(e, Settled):  # a cohort's sum: its members that no receipt told, how it ended
                if self.secure is not None:
                    status = "applied" if e.applied else "abandoned"
                    why = None if e.applied else f"the root refused the site's sum ({e.reason})"
                    # (a refused sum's receipts are its own; a commit's may be other partials' too)
                    skip = set() if e.applied else receipted
                    self._carry(self.secure.settled(e.pid, status, e.version, why, skip=skip))
            else:
                assert isinstance(e, Ack | Nak)

    # --- the privacy ledger (distributed DP) -----------------------------------------------------
    async def _load_ledger(self) -> None:
        """Create the ``ledgers`` bucket if absent and read this site's ledger from it (none: a new site)."""
        from nats.js.api import KeyValueConfig, StorageType
        from nats.js.errors import KeyNotFoundError

        assert self.ledger is not None
        self._ledger_kv = await self._js.create_key_value(
            KeyValueConfig(
                bucket=self.names["ledgers"], history=1, replicas=self.scfg.replicas, storage=StorageType.FILE
            )
        )
        try:
            entry = await self._ledger_kv.get(self.ledger_key)
        except KeyNotFoundError:
            log.info("site %s: no privacy ledger for %r in the cluster yet: a new site", self.site_id, self.ledger_key)
            return
        try:
            self.ledger.load_state_dict(unpack(entry.value or b""))
        except (DecodeError, ValueError, KeyError, TypeError) as exc:
            raise LedgerConflict(
                f"the privacy ledger of site {self.ledger_key!r} in bucket {self.names['ledgers']} "
                f"does not decode ({exc}): refusing to serve cohorts without it"
            ) from None
        self._ledger_revision = int(entry.revision or 0)
        log.info(
            "site %s: privacy ledger of %r read: %d devices, largest epsilon %.3f",
            self.site_id, self.ledger_key, len(self.ledger.releases), self.ledger.max_epsilon,
        )  # fmt: skip

    async def _before_offer(self, partial: Partial) -> None:
        """A cohort's sum leaves only once its contributors' charge is durable in the cluster."""
        if self.ledger is None or not self._unsaved:
            return
        # Every charge so far, later sums' too (an over-count is safe); one made during the write
        # below marks the ledger unsaved again, for its own sum's turn.
        self._unsaved = False
        body = pack(self.ledger.state_dict())
        try:
            self._ledger_revision = await self._retrying(
                "writing the privacy ledger", lambda: self._write_ledger(body), limit=float("inf")
            )
        except BaseException:
            self._unsaved = True
            raise

    async def _write_ledger(self, body: bytes) -> int:
        """Compare-and-set the ledger; the new revision. A write of ours whose answer was lost counts as done."""
        from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

        try:
            return int(await self._ledger_kv.update(self.ledger_key, body, last=self._ledger_revision))
        except KeyWrongLastSequenceError:
            try:
                entry = await self._ledger_kv.get(self.ledger_key)
            except KeyNotFoundError:
                entry = None
            if entry is not None and entry.value == body:
                return int(entry.revision or 0)
            raise LedgerConflict(
                f"another process wrote the privacy ledger of site {self.ledger_key!r} (revision "
                f"{None if entry is None else entry.revision}, this one read {self._ledger_revision}): one "
                "process per aggregator.uplink.site_id; this one stops before its sum leaves"
            ) from None

    async def _committed(self, version: int) -> None:
        """Relay the committed model to the site's devices (retained on the site's broker)."""
        state, run = decode_state((await self._state_kv.get("state")).value)
        self._run = run
        model = ModelMessage(
            version=state.version,
            model=self.spec,
            tensors=state.weights,
            max_staleness=self.cfg.max_staleness,
            run=run,
            created_at=time.time(),
            secagg=self._cohort_params,  # with secure aggregation: the site's devices mask for its cohorts
        )
        self._local.put_nowait((self.topics.model, model.to_bytes(), True))

    async def _send(self, local: aiomqtt.Client) -> None:
        """Receipts and models to the site's devices, in order."""
        while True:
            topic, body, retain = await self._local.get()
            await publish(local, topic, body, qos=1, retain=retain)
