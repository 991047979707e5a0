"""A site aggregator whose root is an ordinary aggregator over MQTT: the service that moves the bytes.

``fedmq aggregator --root mqtts://root-broker:8883 --site-id hospital-a --uplink-dir DIR
--broker mqtt://site-mosquitto``. The decisions are :class:`~aggregator.uplink.UplinkCore`'s;
this module connects the two brokers, keeps the uplink folder and carries the core's effects
out, in order:

* on the root's broker (as MQTT user ``site_id``, the one the root lists in ``aggregator.sites``)
  it reads the model (retained) and its own receipts, and publishes its sums as updates to
  ``{prefix}/update/{site_id}``, with a retained ``online`` status and an ``offline`` Will;
* on the site's broker it reads the devices' updates, and publishes their receipts and, retained,
  each model the root publishes (the same bytes, or with ``aggregator.secure_aggregation`` the
  same model announcing the site's cohorts: then it reads the devices' secure-aggregation
  messages and statuses instead, and learns only each cohort's sum);
* a sum is written to the uplink folder (fsync'd) before it is published; the root's answer
  replaces it by the settled window (:class:`UplinkFolder`).

Either broker may go away: each link reconnects with backoff; sums are sent again until answered
(the root tells a re-sent sum from a new one), and devices re-send what has no receipt.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiomqtt

from aggregator.cohorts import cohort_settings, federation_verifier, with_distributed_dp
from aggregator.privacy import FederationLedger
from aggregator.sharding import ShardCore
from aggregator.site_cohorts import device_input
from aggregator.uplink import DeviceReceipt, KeepSum, SendSecAgg, SendSum, Settle, UplinkCore, UplinkEffect
from fedmq.codec import DecodeLimits
from fedmq.config import BrokerConfig, Config
from fedmq.errors import DecodeError, StateError
from fedmq.messages import ModelMessage, ReceiptMessage, StatusMessage, UpdateMessage, salvage_seq
from fedmq.secagg.messages import MaskedMsg, RevealMsg
from fedmq.secagg.server import CohortManager, SecAggSettings
from fedmq.staleness import make_staleness_fn
from fedmq.state import fsync_dir, write_atomic
from runtime.transport import ask_for_retained, backoff, client_kwargs, describe_failure, publish, subscribe

log = logging.getLogger("fedmq.site")


class UplinkFolder:
    """The site's durable state: ``sums/<seq>.sum`` (sent, not yet answered) and ``settled`` (the window)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.sums = self.path / "sums"
        self.settled = self.path / "settled"

    def load(self) -> tuple[list[bytes], bytes | None]:
        """The kept sums, oldest first, and the settled state (``None``: a new site)."""
        self.sums.mkdir(parents=True, exist_ok=True)
        for stray in self.sums.glob(".*"):  # a write that a crash interrupted: never renamed, never sent
            stray.unlink()
        kept = [p.read_bytes() for p in sorted(self.sums.glob("*.sum"))]
        settled = self.settled.read_bytes() if self.settled.exists() else None
        return kept, settled

    def keep(self, seq: int, body: bytes, state: bytes | None = None) -> None:
        """Write sum ``seq`` durably (before it is sent), after ``state`` (the ledger charged for it), if given."""
        if state is not None:
            write_atomic(self.settled, state)
        write_atomic(self.sums / f"{seq:012d}.sum", body)

    def settle(self, seq: int, state: bytes) -> None:
        """Record the answer (the settled window), then forget the sum."""
        write_atomic(self.settled, state)
        path = self.sums / f"{seq:012d}.sum"
        if path.exists():
            path.unlink()
            fsync_dir(self.sums)


class MqttSite:
    """One site: its devices on ``config.broker``, its root at ``aggregator.uplink.root``."""

    def __init__(self, config: Config, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.cfg = config.aggregator
        self.ucfg = config.aggregator.uplink
        self.site_id = self.ucfg.site_id
        self.topics = config.topics
        self.root_broker = self.ucfg.broker()
        self.folder = UplinkFolder(self.ucfg.state_dir)
        self.limits = DecodeLimits(max_payload_bytes=config.broker.max_payload_bytes)
        self.clock = clock
        self.core: UplinkCore | None = None
        self.ready = asyncio.Event()
        """Set once the root's model is known and the site takes its devices' updates."""
        self._inbox: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._to_root: asyncio.Queue[tuple[str, bytes, bool]] = asyncio.Queue()
        self._to_site: asyncio.Queue[tuple[str, bytes, bool]] = asyncio.Queue()
        self._model: bytes | None = None
        self.secure = self.cfg.secure_aggregation
        self._settings = cohort_settings(self.cfg) if self.secure else None
        self._verifier = federation_verifier(config.broker) if self.secure else None
        self._calibrated: tuple[int, SecAggSettings] | None = None
        """The cohorts' settings for a model size (distributed DP's noise depends on it)."""
        self._heavy = False
        """Unmasking takes long enough (a large model) to run off the event loop."""
        self.reconnects = {"root": 0, "site": 0}
        self.undecodable = 0
        self.model_asks = 0
        """Subscriptions to the root's model topic repeated because no model had come (``uplink.model_wait``)."""

    # --- lifecycle -------------------------------------------------------------------------------
    def startup(self) -> None:
        """Fail fast on our side: the uplink folder must be readable and writable."""
        try:
            self.folder.load()
            probe = self.folder.path / ".probe"
            write_atomic(probe, b"")
            probe.unlink()
        except OSError as exc:
            raise StateError(str(self.folder.path), f"aggregator.uplink.state_dir is not usable: {exc}") from exc

    async def run(self, stop: asyncio.Event | None = None) -> dict[str, Any]:
        """Serve until ``stop``; then send the open sum if it may leave, and return a summary."""
        stop = stop or asyncio.Event()
        self.startup()
        async with asyncio.TaskGroup() as tg:
            tasks = [
                tg.create_task(self._link("root", self.root_broker, self._root_session, stop)),
                tg.create_task(self._link("site", self.config.broker, self._site_session, stop)),
                tg.create_task(self._decide()),
                tg.create_task(self._ticker()),
            ]
            await stop.wait()
            if self.core is not None:
                self._inbox.put_nowait(("flush", None))
                await self._inbox.join()
                await self._drain(self._to_root)
            for t in tasks:
                t.cancel()
        return self.core.stats() if self.core is not None else {"site": self.site_id, "version": None}

    async def _drain(self, queue: asyncio.Queue[tuple[str, bytes, bool]]) -> None:
        """Wait, within the shutdown grace, for what was decided to be published."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.cfg.shutdown_grace):
                await queue.join()

    # --- the decisions -----------------------------------------------------------------------------
    async def _decide(self) -> None:
        """The one task that feeds the core and carries out its effects, one input at a time."""
        while True:
            kind, value = await self._inbox.get()
            try:
                if kind == "secagg" and self._heavy and isinstance(value[1], (MaskedMsg, RevealMsg)):
                    effects = await asyncio.to_thread(self._feed, kind, value)  # only this task feeds the core
                else:
                    effects = self._feed(kind, value)
                await self._carry(effects)
            finally:
                self._inbox.task_done()

    def _feed(self, kind: str, value: Any) -> list[UplinkEffect]:
        now = self.clock()
        if kind == "model":
            return self._on_model(value)
        if self.core is None:
            return []  # the root's model is not known yet: devices re-send
        if kind == "update":
            agent, update = value
            return self.core.update(update, topic_agent=agent, now=now)
        if kind == "receipt":
            return self.core.root_receipt(value, now=now)
        if kind == "secagg":
            agent, msg = value
            return self.core.secagg(agent, msg, now=now)
        if kind == "offline":
            return self.core.offline(value, now=now)
        if kind == "tick":
            return self.core.due(now)
        assert kind == "flush", kind
        return self.core.flush(now)

    def _on_model(self, model: ModelMessage) -> list[UplinkEffect]:
        if self.core is None:
            self.core, effects = self._restore(model)
            log.info(
                "site %s: root model version %d; %d sum(s) kept from before", self.site_id, model.version,
                len(self.core.pending),
            )  # fmt: skip
            self.ready.set()
            return effects + self.core.model(model.version, model.run)
        layout = {k: (v.shape, v.dtype) for k, v in self.core.shard.reference.items()}
        if {k: (v.shape, v.dtype) for k, v in model.tensors.items()} != layout:
            log.error("site %s: the root's model changed its layout; restart the site to follow it", self.site_id)
            return []
        return self.core.model(model.version, model.run)

    def _cohort_settings(self, model: ModelMessage) -> SecAggSettings:
        """The cohorts' settings for the root's model: distributed DP's noise is calibrated for its size (once)."""
        assert self._settings is not None
        n_params = sum(t.size for t in model.tensors.values())
        if self._calibrated is None or self._calibrated[0] != n_params:
            self._calibrated = (n_params, with_distributed_dp(self.cfg, self._settings, n_params))
        return self._calibrated[1]

    def _restore(self, model: ModelMessage) -> tuple[UplinkCore, list[UplinkEffect]]:
        """The core, from the uplink folder, with the root's model as the layout updates must have."""
        kept, settled = self.folder.load()
        shard = ShardCore(
            self.site_id,
            model.tensors,
            version=model.version,
            staleness=make_staleness_fn(self.cfg.staleness.function, self.cfg.staleness.a, self.cfg.staleness.b),
            max_staleness=self.cfg.max_staleness,
            max_update_norm=self.cfg.max_update_norm,
            max_num_examples=self.cfg.max_num_examples,
            partial_size=self.cfg.shard.partial_for(self.cfg.buffer_size),
            partial_wait=self.cfg.shard.partial_wait,
            min_agents=self.cfg.shard.site_min_devices,
        )
        cohorts = None
        ledger = None
        if self._settings is not None:
            settings = self._cohort_settings(model)
            n_params = sum(t.size for t in model.tensors.values())
            cohorts = CohortManager(settings, n_values=n_params + 1, verifier=self._verifier)
            self._heavy = n_params + 1 >= 200_000
            if settings.params.distributed_dp:
                ledger = FederationLedger(self.cfg.dp_delta)
        try:
            return UplinkCore.restore(
                self.site_id,
                shard,
                kept=kept,
                settled=settled,
                limits=self.limits,
                max_pending=self.ucfg.max_pending,
                resend_after=self.ucfg.resend_after,
                run=model.run,
                cohorts=cohorts,
                ledger=ledger,
                max_participation=self.cfg.max_participation if ledger is not None else 0,
                min_separation=self.cfg.min_separation if ledger is not None else 0,
            )
        except (DecodeError, ValueError, KeyError, TypeError) as exc:
            raise StateError(str(self.folder.path), f"the uplink folder is unreadable: {exc}") from exc

    async def _carry(self, effects: list[UplinkEffect]) -> None:
        for e in effects:
            if isinstance(e, KeepSum):
                await asyncio.to_thread(self.folder.keep, e.seq, e.partial, e.state)
            elif isinstance(e, SendSum):
                self._to_root.put_nowait((self.topics.update(self.site_id), e.payload, False))
            elif isinstance(e, Settle):
                await asyncio.to_thread(self.folder.settle, e.seq, e.state)
            elif isinstance(e, SendSecAgg):
                self._to_site.put_nowait((self.topics.secagg_down(e.agent), e.payload, False))
            else:
                assert isinstance(e, DeviceReceipt)
                r = e.receipt
                self._to_site.put_nowait((self.topics.receipt(r.agent_id), r.to_bytes(), False))

    async def _ticker(self) -> None:
        interval = min(0.25, self.cfg.shard.partial_wait / 4)
        while True:
            await asyncio.sleep(interval)  # a clock, not a wait for readiness
            if self.core is not None:
                self._inbox.put_nowait(("tick", None))

    # --- the links -----------------------------------------------------------------------------------
    async def _link(
        self,
        name: str,
        broker: BrokerConfig,
        session: Callable[[aiomqtt.Client], Any],
        stop: asyncio.Event,
    ) -> None:
        """Stay connected to one broker: a session at a time, reconnecting with backoff."""
        delays = backoff()
        will = None
        identifier = f"fedmq-site-{self.site_id}" if name == "root" else f"fedmq-site-{self.site_id}-local"
        if name == "root":
            offline = StatusMessage(self.site_id, "offline", ts=time.time()).to_bytes()
            will = aiomqtt.Will(self.topics.status(self.site_id), offline, qos=1, retain=True)
        while not stop.is_set():
            try:
                async with aiomqtt.Client(**client_kwargs(broker), identifier=identifier, will=will) as client:
                    delays = backoff()
                    await session(client)
            except* aiomqtt.MqttError as group:
                self.reconnects[name] += 1
                delay = next(delays)
                log.warning(
                    "site %s: %s broker connection lost (%s); reconnecting in %.1f s",
                    self.site_id, name, describe_failure(group.exceptions[0], broker), delay,
                )  # fmt: skip
                await asyncio.sleep(delay)  # backoff before reconnecting

    async def _root_session(self, client: aiomqtt.Client) -> None:
        online = StatusMessage(self.site_id, "online", ts=time.time()).to_bytes()
        await publish(client, self.topics.status(self.site_id), online, qos=1, retain=True)
        model_came = asyncio.Event()
        await subscribe(client, self.topics.model, qos=1)
        await subscribe(client, self.topics.receipt(self.site_id), qos=1)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._send(client, self._to_root))
            wait = self.config.aggregator.uplink.model_wait
            tg.create_task(ask_for_retained(client, self.topics.model, model_came, wait=wait, on_ask=self._asking))
            async for msg in client.messages:
                body = bytes(msg.payload) if isinstance(msg.payload, (bytes, bytearray)) else b""
                try:
                    if msg.topic.value == self.topics.model:
                        model = ModelMessage.from_bytes(body, self.limits)
                        if self._settings is not None:  # the site's devices mask for the site's cohorts
                            params = self._cohort_settings(model).params
                            body = dataclasses.replace(model, secagg=params).to_bytes()
                        self._model = body
                        self._to_site.put_nowait((self.topics.model, body, True))
                        self._inbox.put_nowait(("model", model))
                        model_came.set()
                    else:
                        self._inbox.put_nowait(("receipt", ReceiptMessage.from_bytes(body)))
                except DecodeError as exc:  # the root's own messages: a fault of the deployment
                    self.undecodable += 1
                    log.error("site %s: undecodable message from the root on %s: %s", self.site_id, msg.topic, exc)

    def _asking(self) -> None:
        self.model_asks += 1
        wait = self.config.aggregator.uplink.model_wait
        log.info("site %s: no model from the root for %.0f s: subscribing again", self.site_id, wait)

    async def _site_session(self, client: aiomqtt.Client) -> None:
        await self.ready.wait()  # devices are answered only once the root's model is known
        # Subscribed before the model goes out: a device may answer it at once (see the aggregator).
        await subscribe(client, self.topics.update_wildcard, qos=1)
        if self.secure:
            await subscribe(client, self.topics.secagg_up_wildcard, qos=1)
            await subscribe(client, self.topics.status_wildcard, qos=1)
        if self._model is not None:  # (again after a reconnect: the site's broker may have restarted)
            await publish(client, self.topics.model, self._model, qos=1, retain=True)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._send(client, self._to_site))
            async for msg in client.messages:
                topic = msg.topic.value
                body = bytes(msg.payload) if isinstance(msg.payload, (bytes, bytearray)) else b""
                if self.secure and self._device_protocol(topic, body):
                    continue
                agent = self.topics.agent_of(topic, "update")
                if agent is None:
                    continue
                try:
                    update = UpdateMessage.from_bytes(body, self.limits)
                except DecodeError as exc:
                    self.undecodable += 1
                    seq = salvage_seq(body, self.limits) or 0
                    r = ReceiptMessage(agent, seq, "rejected", self._version(), exc.reason, detail=str(exc)[:200])
                    self._to_site.put_nowait((self.topics.receipt(agent), r.to_bytes(), False))
                    continue
                self._inbox.put_nowait(("update", (agent, update)))

    def _device_protocol(self, topic: str, body: bytes) -> bool:
        """A secure-aggregation message or a status from a device (into the inbox); False for anything else."""
        got = device_input(self.topics, topic, body, self.limits)
        if got is None:
            return False
        if got.error is not None:
            self.undecodable += 1
            log.info("site %s: undecodable secure-aggregation message from %s: %s", self.site_id, got.agent, got.error)
        elif got.message is not None:
            self._inbox.put_nowait(("secagg", (got.agent, got.message)))
        elif got.offline:
            self._inbox.put_nowait(("offline", got.agent))
        return True

    def _version(self) -> int:
        return self.core.shard.version if self.core is not None else 0

    @staticmethod
    async def _send(client: aiomqtt.Client, queue: asyncio.Queue[tuple[str, bytes, bool]]) -> None:
        """Publish in order; an item the connection loses is made up for (sums re-sent, devices re-send)."""
        while True:
            topic, body, retain = await queue.get()
            try:
                await publish(client, topic, body, qos=1, retain=retain)
            finally:
                queue.task_done()
