"""The sharded aggregator: one of N shard processes on a NATS cluster (the asyncio service).

Decisions are :mod:`aggregator.sharding`'s; this module moves bytes between them and NATS.

* **Updates.** Devices publish over MQTT to any node. NATS maps ``{prefix}/update/{id}`` to
  the subject ``{prefix.}update.{id}``, which a replicated JetStream work-queue stream keeps
  (``FEDMQ_<PREFIX>_UPDATES``). Every shard pulls from one durable consumer (``shards``), so
  each message goes to one shard at a time. A shard holds the messages it accepted, unacked
  (kept alive with ``in_progress``), until a committed state lists them; one it refuses is
  acked at once. A shard that dies leaves its messages to the others after
  ``aggregator.shard.ack_wait``.
* **Partials** go to the leader by request/reply on ``{prefix.}cluster.offer``; one that gets
  no answer is offered again every lease period (the leader answers a repeat as before).
* **The leader** holds the KV lease ``leader`` (bucket ``fedmq_<prefix>_lease``, TTL
  ``aggregator.shard.lease``), renewed by compare-and-set. Its state (version, run, model,
  applied window) is the key ``state`` of ``fedmq_<prefix>_state``; a step exists once its
  compare-and-set write succeeds. It then appends the step (version, its keys, the window)
  to the commit log, the stream ``FEDMQ_<PREFIX>_COMMITS``, which every shard follows and an
  operator can read back (what went into each version), and publishes the model, retained,
  over MQTT (``broker``: any node's MQTT listener).
* **Receipts** are plain NATS publishes on ``{prefix.}receipt.{id}``: the device's MQTT
  subscription gets them.

Every task runs in one TaskGroup (acks and receipts too, through one sender); SIGTERM offers
the open partial, sends what was decided, and stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import socket
import time
from collections.abc import Sequence
from typing import Any

import aiomqtt

from aggregator.sharding import (
    STALE,
    Ack,
    AppliedWindow,
    LeaderCore,
    LeaderState,
    Nak,
    Offer,
    Partial,
    Receipt,
    Refused,
    Settled,
    ShardCore,
    ShardEffect,
    Taken,
)
from aggregator.store import new_run_id
from fedmq.codec import DecodeLimits, decode_tensors, encode_tensors, pack, unpack
from fedmq.config import Config
from fedmq.errors import ConfigError, DecodeError
from fedmq.messages import ModelMessage, ModelSpec, ReceiptMessage, UpdateMessage, salvage_seq
from fedmq.staleness import make_staleness_fn
from fedmq.topics import is_agent_id
from models import create_model
from runtime.transport import client_kwargs, publish

log = logging.getLogger("fedmq.cluster")
STATE_SCHEMA = 1
_STATE_LIMITS = DecodeLimits(max_payload_bytes=64 * 1024 * 1024, max_array_len=10_000_000)


def names(prefix: str) -> dict[str, str]:
    """The cluster's stream, buckets and subjects for a federation ``prefix``."""
    slug = re.sub(r"[^A-Za-z0-9]+", "_", prefix).strip("_")
    subject = prefix.replace("/", ".")
    return {
        "stream": f"FEDMQ_{slug.upper()}_UPDATES",
        "updates": f"{subject}.update.*",
        "consumer": "shards",
        "state": f"fedmq_{slug}_state",
        "lease": f"fedmq_{slug}_lease",
        "ledgers": f"fedmq_{slug}_ledgers",
        "offer": f"{subject}.cluster.offer",
        "commits": f"FEDMQ_{slug.upper()}_COMMITS",
        "commit": f"{subject}.cluster.commit",
        "receipt": f"{subject}.receipt.",
    }


def encode_state(state: LeaderState, run: str) -> bytes:
    """The leader's committed state as msgpack."""
    return pack(
        {
            "schema": STATE_SCHEMA,
            "version": state.version,
            "run": run,
            "weights": encode_tensors(state.weights),
            "window": state.window.to_wire(),
            "keys": [list(k) for k in state.keys],
            "refused": [list(k) for k in state.refused],
        }
    )


def decode_state(data: bytes) -> tuple[LeaderState, str]:
    """The inverse of :func:`encode_state` (the cluster's own data: damage is an error, not a reject)."""
    obj = unpack(data, _STATE_LIMITS)
    if obj.get("schema") != STATE_SCHEMA:
        raise ValueError(f"cluster state schema {obj.get('schema')!r}, this fedmq reads {STATE_SCHEMA}")
    weights = {k: v.copy() for k, v in decode_tensors(obj["weights"], where="state", limits=_STATE_LIMITS).items()}
    keys = tuple((str(a), int(s)) for a, s in obj.get("keys", []))
    refused = tuple((str(a), int(s)) for a, s in obj.get("refused", []))
    window = AppliedWindow.from_wire(obj["window"])
    return LeaderState(int(obj["version"]), weights, window, keys, refused), str(obj["run"])


class ClusterAggregator:
    """One shard process (and, while it holds the lease, the leader)."""

    def __init__(self, config: Config, *, shard_id: str | None = None, clock: Any = time.time) -> None:
        self.config = config
        self.cfg = config.aggregator
        self.scfg = config.aggregator.shard
        if not self.scfg.nats:
            raise ConfigError("aggregator.shard.nats", "is required for a sharded aggregator")
        self.topics = config.topics
        self.names = names(config.prefix)
        self.clock = clock
        self.shard_id = shard_id or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.spec = ModelSpec(self.cfg.model, self.cfg.num_features, self.cfg.num_classes, self.cfg.hidden)
        model = create_model(
            self.cfg.model,
            num_features=self.cfg.num_features,
            num_classes=self.cfg.num_classes,
            hidden=self.cfg.hidden,
            seed=self.cfg.seed,
        )
        self.initial = model.get_weights()
        self.limits = DecodeLimits(max_payload_bytes=config.broker.max_payload_bytes)
        self.core = ShardCore(
            self.shard_id,
            self.initial,
            version=0,
            staleness=make_staleness_fn(self.cfg.staleness.function, self.cfg.staleness.a, self.cfg.staleness.b),
            max_staleness=self.cfg.max_staleness,
            max_update_norm=self.cfg.max_update_norm,
            max_num_examples=self.cfg.max_num_examples,
            partial_size=self.scfg.partial_for(self.cfg.buffer_size),
            partial_wait=self.scfg.partial_wait,
            stale_by_commit=True,  # another shard may hold a copy: the commit decides (sharding.py)
        )
        self.ready = asyncio.Event()
        self.leading = asyncio.Event()
        self.steps = 0
        """Steps this process committed as leader."""
        self.offered = 0
        """Partials the leader took from this process."""
        self._msgs: dict[int, Any] = {}
        self._offers: asyncio.Queue[Partial] = asyncio.Queue()
        self._out: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        """Acks, naks and receipts for :meth:`_sender`."""
        self.send_failures = 0
        """Acks, naks and receipts the cluster did not take (made up for by redelivery or a re-send)."""
        self._nc: Any = None
        self._js: Any = None

    # --- lifecycle --------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event | None = None) -> dict[str, Any]:
        """Serve until ``stop``; return a summary."""
        import nats  # the [cluster] extra, checked by the command at startup

        stop = stop or asyncio.Event()
        servers = [u.strip() for u in self.scfg.nats.split(",")]
        self._nc = await nats.connect(
            servers, name=f"fedmq-shard-{self.shard_id}", max_reconnect_attempts=-1, reconnect_time_wait=0.5
        )
        try:
            self._js = self._nc.jetstream()
            sub = await self._retrying("setting up the stream and buckets", self._setup_and_subscribe, limit=120)
            self.ready.set()
            log.info("shard %s up: stream %s, %d NATS servers", self.shard_id, self.names["stream"], len(servers))
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(self._consume(sub)),
                    tg.create_task(self._ticker()),
                    tg.create_task(self._offerer()),
                    tg.create_task(self._watch_commits()),
                    tg.create_task(self._campaign()),
                    tg.create_task(self._sender()),
                ]
                await self._serve_until(stop, tasks)
        finally:
            await self._close_nats()
        return {
            "shard": self.shard_id,
            "version": self.core.version,
            "accepted": self.core.accepted,
            "rejected": self.core.rejected,
            "steps_led": self.steps,
            "send_failures": self.send_failures,
        }

    async def _serve_until(self, stop: asyncio.Event, tasks: Sequence[asyncio.Task[None]]) -> None:
        """Wait for ``stop``; offer the open partial (within two lease periods); end ``tasks``."""
        await stop.wait()
        self._carry(self.core.flush())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2 * self.scfg.lease):
                await self._offers.join()  # the offerer has offered it (or given up on it)
                await self._out.join()  # the acks and receipts decided so far are sent
        for t in tasks:
            t.cancel()

    async def _close_nats(self) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await self._nc.close()

    async def _retrying(self, what: str, fn: Any, *, limit: float) -> Any:
        """``fn()`` until it stops failing for a reason of the cluster's (a node restarting, an election)."""
        from nats.errors import Error as NatsError

        deadline = time.monotonic() + limit
        while True:
            try:
                return await fn()
            except NatsError as exc:
                if time.monotonic() > deadline:
                    raise
                log.warning("%s: the cluster does not answer yet (%s); trying again", what, exc or type(exc).__name__)
                await asyncio.sleep(1.0)  # a back-off between attempts, not a wait for an event

    async def _setup_and_subscribe(self) -> Any:
        await self._setup()
        return await self._js.pull_subscribe(
            self.names["updates"], durable=self.names["consumer"], stream=self.names["stream"]
        )

    async def _setup(self) -> None:
        """Create the stream, the consumer and the buckets if absent (any shard may be first)."""
        from nats.js.api import (
            AckPolicy,
            ConsumerConfig,
            KeyValueConfig,
            RetentionPolicy,
            StorageType,
            StreamConfig,
        )
        from nats.js.errors import BadRequestError

        stream = StreamConfig(
            name=self.names["stream"],
            subjects=[self.names["updates"]],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            num_replicas=self.scfg.replicas,
            max_msg_size=self.config.broker.max_payload_bytes,
        )
        try:
            await self._js.add_stream(stream)
        except BadRequestError as exc:  # e.g. more replicas than the cluster has nodes
            raise ConfigError("aggregator.shard.replicas", f"the cluster refused the update stream: {exc}") from None
        consumer = ConsumerConfig(
            durable_name=self.names["consumer"],
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.scfg.ack_wait,
            max_ack_pending=100_000,
            num_replicas=self.scfg.replicas,
        )
        with contextlib.suppress(BadRequestError):  # exists already, with the same settings
            await self._js.add_consumer(self.names["stream"], consumer)
        commits = StreamConfig(
            name=self.names["commits"],
            subjects=[self.names["commit"]],
            storage=StorageType.FILE,
            num_replicas=self.scfg.replicas,
            max_msgs=100_000,
            max_msg_size=self.config.broker.max_payload_bytes,
        )
        await self._js.add_stream(commits)
        self._state_kv = await self._js.create_key_value(
            KeyValueConfig(
                bucket=self.names["state"],
                history=1,
                replicas=self.scfg.replicas,
                max_value_size=self.config.broker.max_payload_bytes,
                storage=StorageType.FILE,
            )
        )
        self._lease_kv = await self._js.create_key_value(
            KeyValueConfig(bucket=self.names["lease"], history=1, ttl=self.scfg.lease, replicas=self.scfg.replicas)
        )

    # --- the shard ----------------------------------------------------------------------------
    async def _consume(self, sub: Any) -> None:
        """Pull updates and hand them to the core; a peer's bad message is refused and acked."""
        from nats.errors import Error as NatsError

        while True:
            try:
                msgs = await sub.fetch(16, timeout=1.0)
            except TimeoutError:  # nothing waiting
                continue
            except NatsError as exc:  # a node restarting under us: the client reconnects
                log.debug("fetch failed: %s", exc)
                await asyncio.sleep(0.5)  # a back-off, not a wait for an event
                continue
            for msg in msgs:
                self._on_update(msg)

    def _on_update(self, msg: Any) -> None:
        token = int(msg.metadata.sequence.stream)
        agent = msg.subject.rsplit(".", 1)[-1]
        self._msgs[token] = msg
        if not is_agent_id(agent):
            self._carry([Ack((token,))])
            return
        try:
            update = UpdateMessage.from_bytes(msg.data, self.limits)
        except DecodeError as exc:
            seq = salvage_seq(msg.data, self.limits) or 0
            log.warning("update from %s refused: %s", agent, exc)
            self._carry([Ack((token,)), Receipt(ReceiptMessage(agent, seq, "rejected", self.core.version, exc.reason))])
            return
        self._carry(self.core.update(token, update, topic_agent=agent, now=self.clock()))

    def _carry(self, effects: Sequence[ShardEffect]) -> None:
        """Carry out the core's effects: acks, naks and receipts queue for :meth:`_sender`, in order."""
        for e in effects:
            if isinstance(e, Ack | Nak):
                for token in e.tokens:
                    msg = self._msgs.pop(token, None)
                    if msg is not None:
                        self._out.put_nowait(("ack" if isinstance(e, Ack) else "nak", msg))
            elif isinstance(e, Receipt):
                r = e.receipt
                self._out.put_nowait(("receipt", (self.names["receipt"] + r.agent_id, r.to_bytes())))
            elif isinstance(e, Offer):
                self._offers.put_nowait(e.partial)
            else:  # a partial settled: its acks and receipts came with it
                assert isinstance(e, Settled)

    async def _sender(self) -> None:
        """Send the queued acks, naks, keep-alives and receipts, in the order they were decided.

        A send the cluster fails (a node restarting, the connection closed) is logged and
        dropped: a lost ack is a redelivery, which the core's window absorbs, and a lost receipt
        a re-send from the device's outbox. Anything else is our bug and ends the TaskGroup.
        """
        from nats.errors import Error as NatsError

        while True:
            kind, item = await self._out.get()
            try:
                if kind == "ack":
                    await item.ack()
                elif kind == "nak":
                    await item.nak(delay=0.5)
                elif kind == "progress":  # a held message's keep-alive: its ack wait starts again
                    held = self._msgs.get(item)
                    if held is not None:  # not acked or handed back meanwhile
                        await held.in_progress()
                else:
                    subject, body = item
                    await self._nc.publish(subject, body)
            except NatsError as exc:
                self.send_failures += 1
                log.info("a %s was not sent (%s); the stream or the device's outbox makes up for it", kind, exc)
            finally:
                self._out.task_done()

    async def _offerer(self) -> None:
        """Offer partials to the leader, one at a time; no answer: the ticker offers it again."""
        from nats.errors import Error as NatsError

        while True:
            partial = await self._offers.get()
            await self._before_offer(partial)
            try:
                reply = await self._nc.request(self.names["offer"], partial.to_bytes(), timeout=self.scfg.lease)
            except NatsError:  # no leader now, or the cluster is electing one
                self._offers.task_done()
                continue
            self._offers.task_done()
            answer = unpack(reply.data)
            if answer.get("status") == "taken":
                self.offered += 1
                self._carry(self.core.answer(Taken(partial.shard, partial.pid)))
            else:
                dups = tuple((str(a), int(s)) for a, s in answer.get("duplicates", []))
                self._carry(self.core.answer(Refused(partial.shard, partial.pid, str(answer.get("reason")), dups)))

    async def _before_offer(self, partial: Partial) -> None:
        """What must be durable before ``partial`` leaves this process (a site's privacy ledger); nothing here."""

    async def _ticker(self) -> None:
        """Time for the core (a partial's wait), keep-alives for held messages, offers again."""
        last_keepalive = last_reoffer = time.monotonic()
        while True:
            await asyncio.sleep(0.2)  # a clock for partial_wait, not a wait for an event
            self._carry(self.core.due(self.clock()))
            now = time.monotonic()
            if now - last_keepalive >= self.scfg.ack_wait / 3:
                last_keepalive = now
                for token in list(self._msgs):
                    self._out.put_nowait(("progress", token))
            if now - last_reoffer >= self.scfg.lease:
                last_reoffer = now
                if self._offers.empty():
                    self._carry(self.core.new_leader())

    async def _watch_commits(self) -> None:
        """Follow the commit log: each step's keys go into this shard's copy of the applied window.

        A log entry carries only its step's keys. The whole window is read from the committed
        state at start and whenever a version was skipped (the log's oldest entries are
        dropped beyond 100,000 steps; a gap is never guessed across).
        """
        from nats.errors import Error as NatsError
        from nats.js.api import DeliverPolicy

        seen = -1
        window = AppliedWindow(self.cfg.max_agents)
        while True:
            try:
                sub = await self._js.subscribe(
                    self.names["commit"], ordered_consumer=True, deliver_policy=DeliverPolicy.LAST
                )
                async for msg in sub.messages:
                    obj = unpack(msg.data, _STATE_LIMITS)
                    version = int(obj["version"])
                    if version <= seen:
                        continue  # announced again by a new leader
                    if version != seen + 1:
                        state, _ = decode_state((await self._state_kv.get("state")).value)
                        seen, window = state.version, state.window
                        self._carry(self.core.commit(seen, window))
                        await self._committed(seen)
                        if version <= seen:
                            continue
                    window.add([(str(a), int(q)) for a, q in obj["keys"]], version)
                    window.add([(str(a), int(q)) for a, q in obj.get("refused", [])], STALE)
                    seen = version
                    self._carry(self.core.commit(version, window))
                    await self._committed(version)
            except NatsError as exc:
                log.warning("watching the commits failed (%s); watching again", exc or type(exc).__name__)
                await asyncio.sleep(1.0)  # a back-off, not a wait for an event

    async def _committed(self, version: int) -> None:
        """A committed version was settled (a site relays its model; a shard has nothing more to do)."""

    # --- the leader ---------------------------------------------------------------------------
    async def _campaign(self) -> None:
        """Take the lease whenever it is free, and lead while it is ours."""
        from nats.errors import Error as NatsError
        from nats.js.errors import KeyWrongLastSequenceError

        while True:
            try:
                revision = await self._lease_kv.create("leader", self.shard_id.encode())
            except KeyWrongLastSequenceError:
                await asyncio.sleep(self.scfg.lease / 2)  # somebody leads: look again later
                continue
            except NatsError as exc:
                log.warning("the lease cannot be asked for now (%s); trying again", exc or type(exc).__name__)
                await asyncio.sleep(self.scfg.lease / 2)
                continue
            log.info("shard %s leads", self.shard_id)
            self.leading.set()
            try:
                await self._lead(revision)
            except* (aiomqtt.MqttError, NatsError) as group:  # the cluster or the MQTT side failed under us
                log.warning("shard %s steps down: %s", self.shard_id, group.exceptions[0])
                with contextlib.suppress(Exception):
                    await self._lease_kv.delete("leader")
                await asyncio.sleep(self.scfg.lease)  # give the others the first try
            finally:
                self.leading.clear()

    async def _lead(self, revision: int) -> None:
        """Lead until the lease is lost (its renewal runs from the first moment)."""
        async with asyncio.TaskGroup() as tg:
            keeper = tg.create_task(self._hold_lease(revision))
            work = tg.create_task(self._serve_as_leader())
            await keeper
            work.cancel()

    async def _serve_as_leader(self) -> None:
        """Load the committed state; take offers one at a time, in this task.

        A commit whose outcome is unknown (the cluster failed under the write) raises: the
        leader steps down, and whoever leads next starts from what was committed. The
        partials it held are offered again by their shards.
        """
        state, run, state_rev = await self._load_or_init()
        core = LeaderCore(state, buffer_size=self.cfg.buffer_size, server_lr=self.cfg.server_lr)
        offers: asyncio.Queue[Any] = asyncio.Queue()
        async with aiomqtt.Client(**client_kwargs(self.config.broker)) as mqtt:
            await self._announce(state, state.keys, run, mqtt)  # again: the last leader may have died before
            sub = await self._nc.subscribe(self.names["offer"], cb=offers.put)
            try:
                while True:
                    msg = await offers.get()
                    try:
                        partial = Partial.from_bytes(msg.data, self.limits)
                    except DecodeError as exc:
                        await msg.respond(pack({"status": "refused", "reason": str(exc)[:200]}))
                        continue
                    answer, step = core.offer(partial)
                    if step is not None:
                        state_rev = await self._commit(core, step, state_rev, run, mqtt)
                    if isinstance(answer, Taken):
                        await msg.respond(pack({"status": "taken"}))
                    else:
                        reply = {"status": "refused", "reason": answer.reason, "duplicates": list(answer.duplicates)}
                        await msg.respond(pack(reply))
            finally:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    async def _hold_lease(self, revision: int) -> None:
        """Renew the lease every third of its life; return when it is lost."""
        from nats.errors import Error as NatsError
        from nats.js.errors import KeyWrongLastSequenceError

        expires = time.monotonic() + self.scfg.lease
        while True:
            await asyncio.sleep(self.scfg.lease / 3)  # the renewal period, not a wait for an event
            try:
                revision = await self._lease_kv.update("leader", self.shard_id.encode(), last=revision)
                expires = time.monotonic() + self.scfg.lease
            except KeyWrongLastSequenceError:
                log.warning("shard %s lost the lease", self.shard_id)
                return
            except NatsError as exc:
                if time.monotonic() >= expires:  # it may be someone else's by now
                    log.warning("shard %s could not renew the lease in time (%s)", self.shard_id, exc)
                    return

    async def _load_or_init(self) -> tuple[LeaderState, str, int]:
        from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

        try:
            entry = await self._state_kv.get("state")
            state, run = decode_state(entry.value)
            return state, run, entry.revision
        except KeyNotFoundError:
            pass
        state, run = LeaderState(0, dict(self.initial), AppliedWindow(self.cfg.max_agents)), new_run_id()
        try:
            revision = await self._state_kv.create("state", encode_state(state, run))
            log.info("a new federation run begins: %s", run)
            return state, run, revision
        except KeyWrongLastSequenceError:  # another leader was first
            entry = await self._state_kv.get("state")
            state, run = decode_state(entry.value)
            return state, run, entry.revision

    async def _commit(self, core: LeaderCore, step: Any, state_rev: int, run: str, mqtt: aiomqtt.Client) -> int:
        """Write a step (compare-and-set); announce and publish it; on a lost race adopt the winner's state."""
        from nats.js.errors import KeyWrongLastSequenceError

        try:
            revision = int(await self._state_kv.update("state", encode_state(step.state, run), last=state_rev))
        except KeyWrongLastSequenceError:
            entry = await self._state_kv.get("state")
            state, _ = decode_state(entry.value)
            refused = core.lost(state)
            log.warning("another leader committed version %d first; %d partials refused", state.version, len(refused))
            return int(entry.revision)
        core.committed()
        self.steps += 1
        await self._announce(step.state, step.keys, run, mqtt)
        return revision

    async def _announce(self, state: LeaderState, keys: Sequence[Any], run: str, mqtt: aiomqtt.Client) -> None:
        """Tell the shards (the commit log) and the devices (the retained model)."""
        commit = {
            "version": state.version,
            "keys": [list(k) for k in keys],
            "refused": [list(k) for k in state.refused],
        }
        await self._js.publish(self.names["commit"], pack(commit), stream=self.names["commits"])
        model = ModelMessage(
            version=state.version,
            model=self.spec,
            tensors=state.weights,
            max_staleness=self.cfg.max_staleness,
            run=run,
            created_at=time.time(),
        )
        await publish(mqtt, self.topics.model, model.to_bytes(), qos=1, retain=True)
        log.info(
            "version %d committed and published (%d updates, %d refused as too stale)",
            state.version, len(keys), len(state.refused),
        )  # fmt: skip
