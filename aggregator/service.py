"""The aggregator service: the asyncio loop that owns all I/O around :class:`AggregatorCore`.

Lifecycle (after uvicorn's ``Server``): :meth:`AggregatorService.startup` builds the model
and core, restores the checkpoint and loads the evaluation set, failing fast on bad config;
:meth:`AggregatorService.run` connects (reconnecting with backoff), publishes the current
model retained, and consumes updates as they arrive; on stop (SIGTERM in the CLI) it
checkpoints, publishes final metrics and its ``stopped`` status, and disconnects.

A peer's bad message never stops the service: it is rejected with a reason, counted,
logged once per (agent, reason) without its payload, and published in the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiomqtt

from aggregator.core import Accepted, AggregatorCore, Rejected, make_rule
from aggregator.robust import build_aggregate
from aggregator.rules.robust import dp_norm_window
from aggregator.staleness import make_staleness_fn
from aggregator.wal import WriteAheadLog
from fedmq.codec import DecodeLimits
from fedmq.config import Config
from fedmq.errors import ConfigError, DecodeError, RejectReason
from fedmq.messages import ModelMessage, ModelSpec, ReceiptMessage, StatusMessage, UpdateMessage, metrics_to_bytes
from fedmq.runtime import Pulse
from fedmq.state import read_state, write_state
from fedmq.transport import backoff, client_kwargs, publish, subscribe
from models import create_model
from models.base import evaluate
from models.datasets import Dataset, load_source

log = logging.getLogger("fedmq.aggregator")
CHECKPOINT_NAME = "aggregator.ckpt"
CHECKPOINT_KIND = "aggregator-checkpoint"


@dataclass
class Progress:
    """A snapshot for progress displays and the metrics topic."""

    version: int
    accuracy: float | None
    loss: float | None
    accepted: int
    rejected: int
    rejected_by_reason: dict[str, int]
    mean_staleness: float
    max_epsilon: float
    agents_online: int
    elapsed: float
    dropped_overload: int = 0
    robust: dict[str, int] = field(default_factory=dict)
    """What robust aggregation did: deltas ``clipped`` by norm bounding, ``excluded`` by Krum."""
    agents_offline: int = 0
    """Agents heard from before that are offline now (Will, stopped, or silent past the timeout)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain map (the metrics payload)."""
        return dict(self.__dict__)


@dataclass
class EvalPoint:
    """Test accuracy of one model version at a wall-clock time since start."""

    elapsed: float
    version: int
    accuracy: float
    loss: float


@dataclass
class _Runtime:
    started: float = 0.0
    evals: list[EvalPoint] = field(default_factory=list)
    logged: set[tuple[str, str]] = field(default_factory=set)
    connections: int = 0
    """Successful broker connections (1 + reconnects)."""
    replayed: int = 0
    """Accepted updates restored from the write-ahead log at startup."""


class _Stop(Exception):
    pass


class AggregatorService:
    """The asyncio aggregator around a sans-IO core.

    Args:
        config: validated configuration (``broker``, ``aggregator``, ``prefix``).
        eval_data: held-out set (overrides ``aggregator.eval_data``).
        on_progress: called with a :class:`Progress` after each evaluation and metrics tick.
        clock: monotonic clock (injected for tests).
    """

    def __init__(
        self,
        config: Config,
        *,
        eval_data: Dataset | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.cfg = config.aggregator
        self.topics = config.topics
        self.eval_data = eval_data
        self.on_progress = on_progress
        self.clock = clock
        self.spec = ModelSpec(self.cfg.model, self.cfg.num_features, self.cfg.num_classes, self.cfg.hidden)
        self.core: AggregatorCore | None = None
        self.rt = _Runtime()
        self.done = asyncio.Event()
        self.ready = asyncio.Event()
        self._limits = DecodeLimits(max_payload_bytes=config.broker.max_payload_bytes)
        self._eval_wanted = asyncio.Event()
        self._model_dirty = asyncio.Event()
        self._eval_model: Any = None
        self._last_checkpoint_version = -1
        self._wal: WriteAheadLog | None = None
        self._receipts: asyncio.Queue[ReceiptMessage] = asyncio.Queue(maxsize=self.INCOMING_QUEUE)
        self._last_seen: dict[str, float] = {}  # agent -> clock() of its last message
        self._last_sweep = 0.0
        self._incoming: asyncio.Queue[aiomqtt.Message] | None = None
        self._unsynced: list[ReceiptMessage] = []  # accepted, written, awaiting the group fsync
        self._unsynced_bytes = 0
        self._version_pending = False
        self._model_view: ModelMessage | None = None
        self._update_bytes = 0  # payload bytes of every update received, for bytes_per_update
        self._update_count = 0
        self.pulse = Pulse()
        """Notified after every update, status, new version and evaluation."""

    GROUP_COMMIT_UPDATES = 64
    GROUP_COMMIT_BYTES = 64 * 1024 * 1024
    """A group commit fsyncs when the incoming queue runs dry or one of these is reached."""

    INCOMING_QUEUE = 10_000
    """Received messages waiting to be processed; beyond it they are dropped and counted."""

    def _incoming_queue_type(self) -> type[asyncio.Queue[aiomqtt.Message]]:
        """A queue class for aiomqtt that counts what it drops when full (aiomqtt only logs it)."""
        service = self

        class CountingQueue(asyncio.Queue[aiomqtt.Message]):
            def __init__(self, maxsize: int = 0) -> None:
                super().__init__(maxsize)
                service._incoming = self

            def put_nowait(self, item: aiomqtt.Message) -> None:
                try:
                    super().put_nowait(item)
                except asyncio.QueueFull:
                    if service.core is not None:
                        service.core.stats.dropped_overload += 1
                    raise

        return CountingQueue

    # --- lifecycle --------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path | None:
        """Where checkpoints go (``None``: checkpointing off)."""
        return Path(self.cfg.checkpoint_dir) / CHECKPOINT_NAME if self.cfg.checkpoint_dir else None

    def startup(self) -> AggregatorCore:
        """Build model and core, restore the checkpoint, load evaluation data. Fails fast, naming the key."""
        try:
            model = create_model(
                self.spec.name,
                num_features=self.spec.num_features,
                num_classes=self.spec.num_classes,
                hidden=self.spec.hidden,
                seed=self.cfg.seed,
            )
        except (ValueError, ImportError) as exc:
            raise ConfigError("aggregator.model", str(exc)) from None
        self._eval_model = model
        c = self.cfg
        robust = c.robust != "none" or c.norm_bound is not None
        rule = make_rule(
            c.rule,
            staleness_fn=make_staleness_fn(c.staleness.function, c.staleness.a, c.staleness.b),
            alpha=c.alpha,
            buffer_size=c.buffer_size,
            server_lr=c.server_lr,
            momentum=c.server_momentum,
            aggregate=build_aggregate(
                c.robust,
                norm_bound=c.norm_bound,
                trim_fraction=c.trim_fraction,
                krum_f=c.krum_f,
                krum_m=c.krum_m or None,
            )
            if robust and c.rule != "fedasync"
            else None,
            max_norm=c.norm_bound if c.rule == "fedasync" else None,
        )
        weights = model.get_weights()
        window = None
        if c.dp_noise_multiplier is not None:
            dim = sum(int(w.size) for w in weights.values())
            window = dp_norm_window(dim, c.dp_noise_multiplier * c.dp_clip_norm, c.dp_clip_norm)
        core = AggregatorCore(
            weights,
            rule,
            max_staleness=c.max_staleness,
            sync_agents=c.sync_agents,
            seed=c.seed,
            norm_window=window,
        )
        path = self.checkpoint_path
        if path is not None:
            try:
                state = read_state(path, CHECKPOINT_KIND)
                if state is not None:
                    core.load_state_dict(state)
                    log.info("resumed from %s at version %d", path, core.version)
                self._wal = WriteAheadLog(path.parent, int(state.get("wal_generation", 0)) if state else 0)
            except (ValueError, OSError) as exc:
                raise ConfigError("aggregator.checkpoint_dir", str(exc)) from None
            self._replay(core, self._wal)
        if self.eval_data is None and self.cfg.eval_data:
            try:
                self.eval_data = load_source(self.cfg.eval_data)
            except (ValueError, OSError, ImportError, AttributeError) as exc:
                raise ConfigError("aggregator.eval_data", str(exc)) from None
        if self.eval_data is not None and self.eval_data.x.shape[1] != self.spec.num_features:
            raise ConfigError(
                "aggregator.num_features",
                f"{self.spec.num_features}, but the evaluation data has {self.eval_data.x.shape[1]} features",
            )
        self.core = core
        self._last_checkpoint_version = core.version
        return core

    async def run(self, stop: asyncio.Event | None = None) -> dict[str, Any]:
        """Serve until ``stop`` is set, ``max_versions`` or ``target_accuracy`` is reached; return the summary."""
        stop = stop or asyncio.Event()
        if self.core is None:
            self.startup()
        self.rt.started = self.clock()
        delays = backoff()
        will = aiomqtt.Will(self.topics.server_status, self._status("offline"), qos=1, retain=True)
        evaluator = asyncio.create_task(self._evaluator())
        self._eval_wanted.set()
        try:
            while not stop.is_set() and not self.done.is_set():
                try:
                    async with aiomqtt.Client(
                        **client_kwargs(self.config.broker),
                        will=will,
                        # A persistent session: while the aggregator restarts, the broker queues
                        # the updates published to it (QoS 1) instead of dropping them.
                        clean_session=False,
                        identifier=f"fedmq-aggregator-{self.topics.prefix.replace('/', '-')}",
                        queue_type=self._incoming_queue_type(),
                        max_queued_incoming_messages=self.INCOMING_QUEUE,
                    ) as client:
                        delays = backoff()
                        self.rt.connections += 1
                        await self._session(client, stop)
                except* aiomqtt.MqttError as group:
                    self.ready.clear()
                    delay = next(delays)
                    log.warning("broker connection lost (%s); reconnecting in %.1f s", group.exceptions[0], delay)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(delay):
                            await stop.wait()
        finally:
            evaluator.cancel()
            await asyncio.wait([evaluator])  # unlike suppress(CancelledError), keeps our own cancellation
            await self._final_evaluation()
            await self._flush_wal()
            await self.checkpoint()
            if self._wal is not None:
                self._wal.close()
        return self.summary()

    async def _session(self, client: aiomqtt.Client, stop: asyncio.Event) -> None:
        await publish(client, self.topics.server_status, self._status("online"), qos=1, retain=True)
        self._maybe_start_round()
        self._mark_model_dirty()
        await self.publish_pending_model(client)
        await subscribe(client, self.topics.update_wildcard, qos=1)
        await subscribe(client, self.topics.status_wildcard, qos=1)
        self.ready.set()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._receive(client))
                tg.create_task(self._metrics_loop(client))
                tg.create_task(self._model_publisher(client))
                tg.create_task(self._receipt_publisher(client))
                # The body itself waits (not a child task): on Python 3.11 a child failing while the
                # body has already finished leaves the parent task cancelled (fixed in later CPython releases).
                await self._watch(stop)
        except* _Stop:
            pass
        await publish(client, self.topics.metrics, metrics_to_bytes(self.progress().to_dict()), qos=1, retain=True)
        await publish(client, self.topics.server_status, self._status("stopped"), qos=1, retain=True)

    async def _watch(self, stop: asyncio.Event) -> None:
        waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self.done.wait())]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
        raise _Stop

    # --- messages ---------------------------------------------------------------------------
    async def _receive(self, client: aiomqtt.Client) -> None:
        async for msg in client.messages:
            topic = msg.topic.value
            payload = msg.payload if isinstance(msg.payload, (bytes, bytearray)) else b""
            agent = self.topics.agent_of(topic, "update")
            if agent is not None:
                await self._on_update(agent, bytes(payload))
            elif (agent := self.topics.agent_of(topic, "status")) is not None:
                await self._on_status(agent, bytes(payload))
            if self.clock() - self._last_sweep >= 1.0:
                await self.expire_silent_agents()
            self.pulse.notify()

    async def expire_silent_agents(self) -> list[str]:
        """Mark offline every online agent silent for longer than ``aggregator.agent_timeout``.

        Runs on the receive path (at most once a second), so the core has one writer; a sync
        round waiting for such an agent completes without it.
        """
        core = self._core
        now = self._last_sweep = self.clock()
        silent = [a for a in core.online if now - self._last_seen.get(a, now) > self.cfg.agent_timeout]
        for agent in silent:
            log.info("agent %s silent for %.0f s: counted offline", agent, now - self._last_seen[agent])
            if core.agent_status(agent, False) is not None:
                await self._new_version()
        return silent

    async def _on_update(self, topic_agent: str, payload: bytes) -> None:
        core = self._core
        self._last_seen[topic_agent] = self.clock()
        self._update_bytes += len(payload)
        self._update_count += 1
        try:
            update = UpdateMessage.from_bytes(payload, self._limits)
        except DecodeError as exc:  # no seq to answer: the agent re-sends after its receipt timeout
            self._log_rejection(core.reject(Rejected(topic_agent, None, exc.reason, exc.detail)), topic_agent)
            return
        result = core.receive(update, topic_agent_id=topic_agent)
        if isinstance(result, Rejected):
            self._log_rejection(result, topic_agent)
            original = core.receipt_for(topic_agent, update.seq) if result.reason is RejectReason.DUPLICATE else None
            if original is not None:  # a re-send of an accepted update: the same receipt again
                await self._flush_wal()  # ... once the original is durable (it may be in this group)
                version, index = original
                self._send_receipt(ReceiptMessage(topic_agent, update.seq, "accepted", version, index=index))
            else:
                self._send_receipt(
                    ReceiptMessage(topic_agent, update.seq, "rejected", core.version, result.reason.value)
                )
            return
        assert isinstance(result, Accepted)
        receipt = ReceiptMessage(topic_agent, update.seq, "accepted", core.version, index=result.index)
        if self._wal is None:
            self._send_receipt(receipt)
            if result.new_version is not None:
                await self._new_version()
            return
        # Group commit: the update is written now and fsync'd with the others that are already
        # waiting; its receipt and any version it made wait for that fsync.
        if len(payload) >= 256 * 1024:
            await asyncio.to_thread(self._wal.write, topic_agent, payload)
        else:
            self._wal.write(topic_agent, payload)
        self._unsynced.append(receipt)
        self._unsynced_bytes += len(payload)
        self._version_pending |= result.new_version is not None
        incoming = self._incoming
        if (
            incoming is None
            or incoming.empty()
            or len(self._unsynced) >= self.GROUP_COMMIT_UPDATES
            or self._unsynced_bytes >= self.GROUP_COMMIT_BYTES
        ):
            await self._flush_wal()

    async def _flush_wal(self) -> None:
        """Make what was written durable, then send its receipts and publish the version it made."""
        if self._wal is None or not (self._unsynced or self._version_pending):
            return
        await asyncio.to_thread(self._wal.sync)
        receipts, self._unsynced, self._unsynced_bytes = self._unsynced, [], 0
        for receipt in receipts:
            self._send_receipt(receipt)
        if self._version_pending:
            self._version_pending = False
            await self._new_version()

    async def _on_status(self, agent: str, payload: bytes) -> None:
        await self._flush_wal()  # a round may start below: it must see only durable updates
        core = self._core
        self._last_seen[agent] = self.clock()
        online = False
        if payload:
            try:
                status = StatusMessage.from_bytes(payload, self._limits)
            except DecodeError as exc:
                log.debug("bad status from %s: %s", agent, exc)
                return
            if status.agent_id != agent:
                log.warning("status on %s's topic names agent %r; ignored", agent, status.agent_id)
                return
            online = status.state in ("online", "training")
        if core.agent_status(agent, online) is not None:
            await self._new_version()
        else:
            self._maybe_start_round()

    async def _new_version(self) -> None:
        await self._flush_wal()  # nothing is published or checkpointed that is not yet durable
        core = self._core
        self._maybe_start_round()
        self._mark_model_dirty()
        if core.version % self.cfg.eval_every == 0:
            self._eval_wanted.set()
        if core.version - self._last_checkpoint_version >= self.cfg.checkpoint_every:
            await self.checkpoint()
        if self.cfg.max_versions and core.version >= self.cfg.max_versions:
            self.done.set()

    def _maybe_start_round(self) -> None:
        core = self._core
        if core.mode != "sync" or core.selected is not None:
            return
        if len(core.online) < max(1, self.cfg.sync_agents):
            return
        core.start_round()
        self._mark_model_dirty()

    def _send_receipt(self, receipt: ReceiptMessage) -> None:
        """Queue a receipt for the publisher; if the queue is full it is dropped (the agent re-sends)."""
        with contextlib.suppress(asyncio.QueueFull):
            self._receipts.put_nowait(receipt)

    async def _receipt_publisher(self, client: aiomqtt.Client) -> None:
        """Publish receipts in order, off the receive loop (which never waits on a PUBACK)."""
        while True:
            receipt = await self._receipts.get()
            await publish(client, self.topics.receipt(receipt.agent_id), receipt.to_bytes(), qos=1)

    async def publish_pending_receipts(self, client: Any) -> None:
        """Publish every queued receipt now (tests and shutdown)."""
        while not self._receipts.empty():
            receipt = self._receipts.get_nowait()
            await publish(client, self.topics.receipt(receipt.agent_id), receipt.to_bytes(), qos=1)

    async def _model_publisher(self, client: aiomqtt.Client) -> None:
        """Publish the newest model whenever it changed.

        Versions made while a publish is in flight, or within ``aggregator.model_interval`` of
        the last publish, coalesce into one publish of the newest: the retained topic only needs
        the latest, and the receive loop never waits on a PUBACK.
        """
        while True:
            await self._model_dirty.wait()
            await self.publish_pending_model(client)
            if self.cfg.model_interval > 0:
                await asyncio.sleep(self.cfg.model_interval)  # a rate limit, not a wait for an event

    def _mark_model_dirty(self) -> None:
        """Take the model to publish now.

        The core may move on (with updates not yet durable) while the publisher waits for the
        broker, and must not leak those.
        """
        core = self._core
        self._model_view = ModelMessage(
            version=core.version,
            model=self.spec,
            tensors=core.weights,  # replaced, never mutated, by the core: a reference is a snapshot
            mode=core.mode,  # type: ignore[arg-type]
            selected=core.selected,
            max_staleness=core.max_staleness,
        )
        self._model_dirty.set()

    async def publish_pending_model(self, client: Any) -> None:
        """Publish the model taken by the last :meth:`_mark_model_dirty` (retained, QoS 1), once."""
        if not self._model_dirty.is_set():
            return
        self._model_dirty.clear()
        view = self._model_view
        if view is None or (view.mode == "sync" and view.selected is None):
            return  # no round open: nobody should train yet
        msg = replace(view, created_at=time.time())
        await publish(client, self.topics.model, msg.to_bytes(), qos=1, retain=True)

    def _log_rejection(self, rejected: Rejected, sender: str) -> None:
        """Log a rejection once per (sender, reason); never the payload.

        ``sender`` is the agent the topic names: the identity the broker authenticated (with the
        generated ACL), not whatever the payload claims. Both it and the detail are clipped
        and escaped, and the set of logged keys is bounded, so a peer cannot flood the log.
        """
        key = (sender[:64], rejected.reason.value)
        if key in self.rt.logged or len(self.rt.logged) >= 10_000:
            return
        self.rt.logged.add(key)
        log.warning(
            "rejected an update from %r: %s (%s); further ones are counted, not logged",
            key[0],
            rejected.reason.value,
            rejected.detail[:200],
        )

    # --- evaluation, metrics, checkpoints ---------------------------------------------------
    async def _evaluator(self) -> None:
        """Evaluate the newest version in a worker thread, one evaluation at a time."""
        while True:
            await self._eval_wanted.wait()
            self._eval_wanted.clear()
            await self._evaluate_current()

    async def _evaluate_current(self) -> None:
        if self.eval_data is None or self.core is None:
            return
        if self.rt.evals and self.rt.evals[-1].version == self.core.version:
            return
        version, weights = self.core.version, self.core.weights
        loss, acc = await asyncio.to_thread(self._evaluate, weights)
        self.rt.evals.append(EvalPoint(self.clock() - self.rt.started, version, acc, loss))
        if self.cfg.target_accuracy is not None and acc >= self.cfg.target_accuracy:
            self.done.set()
        self.pulse.notify()
        if self.on_progress is not None:
            self.on_progress(self.progress())

    def _evaluate(self, weights: dict[str, Any]) -> tuple[float, float]:
        assert self.eval_data is not None
        self._eval_model.set_weights(weights)
        return evaluate(self._eval_model, self.eval_data.x, self.eval_data.y)

    async def _final_evaluation(self) -> None:
        with contextlib.suppress(Exception):
            await self._evaluate_current()

    async def _metrics_loop(self, client: aiomqtt.Client) -> None:
        while True:
            progress = self.progress()
            await publish(client, self.topics.metrics, metrics_to_bytes(progress.to_dict()), qos=0, retain=True)
            if self.on_progress is not None:
                self.on_progress(progress)
            await asyncio.sleep(self.cfg.metrics_interval)

    async def checkpoint(self) -> None:
        """Write model, version, rule state, dedupe state and counters atomically (in a thread).

        The checkpoint names the write-ahead-log generation that starts after it; the log is
        rotated only once the checkpoint is on disk, so a crash at any point leaves either the
        old checkpoint with its full log or the new one with an empty log.
        """
        path = self.checkpoint_path
        if path is None or self.core is None:
            return
        state = self.core.state_dict()
        wal = self._wal
        if wal is not None:
            state["wal_generation"] = wal.generation + 1
        await asyncio.to_thread(write_state, path, CHECKPOINT_KIND, state)
        if wal is not None:
            await asyncio.to_thread(wal.rotate, wal.generation + 1)
        self._last_checkpoint_version = self.core.version

    def _replay(self, core: AggregatorCore, wal: WriteAheadLog) -> None:
        """Feed the log's accepted updates back through the core: the state before the crash."""
        replayed = 0
        for agent, payload in wal.records():
            try:
                result = core.receive(UpdateMessage.from_bytes(payload, self._limits), topic_agent_id=agent)
            except DecodeError as exc:  # only if the limits changed since the update was accepted
                log.warning("write-ahead log: an update from %r no longer decodes (%s); skipped", agent, exc)
                continue
            if isinstance(result, Rejected):
                log.warning("write-ahead log: replaying %r's update was rejected (%s)", agent, result.detail)
                continue
            replayed += 1
        wal.prune()
        if replayed:
            log.info("replayed %d accepted updates from %s: now at version %d", replayed, wal.path, core.version)
        self.rt.replayed = replayed

    # --- reporting --------------------------------------------------------------------------
    @property
    def _core(self) -> AggregatorCore:
        assert self.core is not None, "startup() has not run"
        return self.core

    def _status(self, state: str) -> bytes:
        return StatusMessage("server", state, ts=time.time()).to_bytes()  # type: ignore[arg-type]

    def progress(self) -> Progress:
        """Current figures."""
        core = self._core
        last = self.rt.evals[-1] if self.rt.evals else None
        return Progress(
            version=core.version,
            accuracy=last.accuracy if last else None,
            loss=last.loss if last else None,
            accepted=core.stats.accepted,
            rejected=sum(core.stats.rejected.values()),
            rejected_by_reason=dict(core.stats.rejected),
            mean_staleness=core.stats.mean_staleness,
            max_epsilon=core.stats.max_epsilon,
            agents_online=len(core.online),
            agents_offline=len(self._last_seen.keys() - core.online),
            dropped_overload=core.stats.dropped_overload,
            robust=dict(core.rule.counters),
            elapsed=self.clock() - self.rt.started if self.rt.started else 0.0,
        )

    def summary(self) -> dict[str, Any]:
        """The run's summary (the demo's JSON)."""
        p = self.progress()
        return {
            "final_accuracy": p.accuracy,
            "final_loss": p.loss,
            "model_versions": p.version,
            "updates_accepted": p.accepted,
            "updates_rejected": p.rejected,
            "rejected_by_reason": p.rejected_by_reason,
            "dropped_overload": p.dropped_overload,
            "mean_staleness": round(p.mean_staleness, 3),
            "max_epsilon": p.max_epsilon,
            "wall_seconds": round(p.elapsed, 2),
            "rule": self.cfg.rule,
            "robust": self.cfg.robust,
            "robust_counters": p.robust,
            "accuracy_history": [[round(e.elapsed, 3), e.version, round(e.accuracy, 4)] for e in self.rt.evals],
            "bytes_per_update": round(self._update_bytes / self._update_count) if self._update_count else None,
        }


__all__ = ["AggregatorService", "EvalPoint", "Progress", "RejectReason"]
