"""The edge agent's asyncio service: the only part of the agent that does I/O.

One ``aiomqtt.Client`` per agent (``async with``), an MQTT Will that marks the agent
``offline`` if it vanishes, the retained global model read with ``async for`` over
``client.messages``, training in a worker thread so the MQTT loop stays responsive, QoS 1
publishes, and reconnection with exponential backoff and jitter. An update whose publish
did not complete is kept and re-sent after the reconnect.

The agent follows the aggregator: the newest model message it receives is the one it trains
on, even at a lower version (a rollback) or of another run (a fresh start); updates trained on
another run are dropped from the outbox, and after the aggregator says it does not know an
update's base, nothing more is trained on that base, so no privacy budget is spent on updates
that would all be refused. A ``retry`` receipt keeps the update and pauses training until
it is due again. At SIGTERM an unfinished local round is abandoned before its release
(``agent.shutdown_grace``): nothing is released and no budget spent.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import aiomqtt

from edge_agent.outbox import Outbox
from edge_agent.pipeline import BudgetExhausted
from edge_agent.trainer import LocalTrainer, TrainingDiverged
from fedmq.codec import DecodeLimits
from fedmq.config import Config
from fedmq.errors import ConfigError, DecodeError
from fedmq.messages import AgentState, ModelMessage, ReceiptMessage, StatusMessage, UpdateMessage
from models.base import TrainingCancelled
from runtime.process import Pulse
from runtime.transport import (
    ask_for_retained,
    backoff,
    client_kwargs,
    describe_failure,
    publish,
    subscribe,
    tolerate_aiomqtt_disconnect_race,
)

if TYPE_CHECKING:  # the cryptography behind secure aggregation loads only when an aggregator asks for it
    from edge_agent.secure import SecureUploads
    from fedmq.secagg.client import Output

UNKNOWN_BASE = ("unknown_base_version", "wrong_run")
"""Refusals that mean the aggregator no longer knows the model an update was trained on."""

log = logging.getLogger("fedmq.agent")
INLINE_MASK_VALUES = 50_000
"""Secure aggregation: an update of fewer values is masked on the event loop (under a millisecond
for each neighbour), a larger one in a worker thread."""


@dataclass
class SecureStats:
    """What the agent did in secure-aggregation cohorts (see :mod:`edge_agent.secure`)."""

    cohorts_joined: int = 0
    cohorts_applied: int = 0
    cohorts_abandoned: int = 0
    masked_uploads: int = 0
    summed: int = 0
    """Uploads a cohort's applied sum included."""
    refused: Counter[str] = dataclasses.field(default_factory=Counter)
    """Cohorts this device left because the aggregator's message failed a check, by reason."""
    ignored: Counter[str] = dataclasses.field(default_factory=Counter)
    dropped_stale: int = 0
    """Outbox updates dropped because they were too stale for any cohort to take."""
    in_doubt: int = 0
    """Uploads whose cohort ended without word of their fate, held until a receipt or the cohort's end says."""


@dataclass
class AgentStats:
    """What the agent did; returned by :meth:`AgentService.run`."""

    updates_published: int = 0
    """Updates published for the first time (a re-send is counted in ``resent``)."""
    resent: int = 0
    receipts_accepted: int = 0
    receipts_rejected: int = 0
    models_received: int = 0
    model_asks: int = 0
    """Subscriptions to the model topic repeated because no model had come within ``agent.model_wait``."""
    bad_models: int = 0
    diverged: int = 0
    """Local rounds skipped because training produced NaN or Inf."""
    retries: int = 0
    """``retry`` receipts (rate limit, buffer): the update was kept and sent again later."""
    dropped_other_run: int = 0
    """Outbox updates dropped because they were trained on a run the aggregator no longer runs."""
    quarantined: int = 0
    """Outbox entries found on disk that no longer decode (set aside, not sent)."""
    abandoned: int = 0
    """Local rounds abandoned at shutdown before their release."""
    reconnects: int = 0
    last_version: int = -1
    epsilon: float | None = None
    state: str = "starting"
    secure: SecureStats = dataclasses.field(default_factory=SecureStats)
    """Secure aggregation: cohorts joined, applied, abandoned, refused (see :mod:`edge_agent.secure`)."""

    def to_dict(self) -> dict[str, object]:
        """Plain values (the JSON ``fedmq agent`` prints at exit)."""
        out: dict[str, object] = dict(self.__dict__)
        out["secure"] = {k: dict(v) if isinstance(v, dict) else v for k, v in self.secure.__dict__.items()}
        return out


class _Finished(Exception):
    """The agent has nothing more to do (update limit or privacy budget)."""


class _Stopped(Exception):
    """Stop was requested."""


def check_certificate_identity(config: Config) -> None:
    """Fail fast when the client certificate names another agent than ``agent.agent_id``.

    A broker from ``fedmq broker init`` takes the certificate's common name as the username
    and only lets it write to its own topics: with a mismatched id every update would be
    dropped silently by the broker's ACL.
    """
    cert = config.broker.cert_file
    if not cert:
        return
    from broker.pki import certificate_common_name  # cryptography only when TLS is used

    cn = certificate_common_name(cert)
    if cn != config.agent.agent_id:
        raise ConfigError(
            "agent.agent_id",
            f"is {config.agent.agent_id!r} but the certificate {cert} belongs to {cn!r}; use --id {cn}",
        )


class AgentService:
    """Runs one edge agent until stopped, its update limit, or its privacy budget.

    Args:
        config: the validated configuration (sections ``broker``, ``agent``, ``privacy``).
        trainer: the local trainer (owns data, model, privacy pipeline).
        compute_delay: simulation hook; seconds to wait after each local round, emulating a
            slower device. ``None`` on real devices.
        rng: randomness for reconnect jitter.
        on_model: called in a worker thread with each newer global model (e.g. ONNX export);
            its errors are logged, never fatal.
        on_receipt: called on the event loop with each receipt that settles an outbox entry and
            that entry's bytes (device-side audit or logging); keep it quick.
    """

    def __init__(
        self,
        config: Config,
        trainer: LocalTrainer,
        *,
        compute_delay: Callable[[], float] | None = None,
        rng: random.Random | None = None,
        on_model: Callable[[ModelMessage], None] | None = None,
        on_receipt: Callable[[ReceiptMessage, bytes], None] | None = None,
    ) -> None:
        self.config = config
        self.trainer = trainer
        self.agent_id = config.agent.agent_id
        check_certificate_identity(config)
        self.topics = config.topics
        self.compute_delay = compute_delay
        self.on_model = on_model
        self.on_receipt = on_receipt
        self._on_model_busy = False
        self._hook_task: asyncio.Task[None] | None = None
        self._training: asyncio.Future[None] | None = None
        self.rng = rng or random.Random()
        self.stats = AgentStats()
        a = config.agent
        outbox_dir = Path(a.state_dir) / f"{self.agent_id}.outbox" if a.state_dir else None
        self._limits = DecodeLimits(max_payload_bytes=config.broker.max_payload_bytes)
        self.outbox = Outbox(outbox_dir, a.outbox_max, validate=self._undecodable)
        """Released updates without a receipt yet (see :mod:`edge_agent.outbox`)."""
        self.stats.quarantined = self.outbox.quarantined
        self._sent_at: dict[int, float] = {}  # seq -> monotonic time of its last publish in this session
        self._ever_sent: set[int] = set()
        self._receipt = asyncio.Event()
        self._flush_lock = asyncio.Lock()
        self._draining = asyncio.Event()
        self._drain_wait: float | None = None
        self._latest: ModelMessage | None = None
        self._run: str | None = None
        self._blocked: tuple[str | None, int] | None = None  # (run, version) the aggregator does not know
        self._pause_until = 0.0  # monotonic: no training before (a retry receipt)
        self._resend_wanted = asyncio.Event()
        self._model_came = asyncio.Event()  # a model came in this session (see runtime.transport.ask_for_retained)
        self._cancel: threading.Event | None = None
        self._new_model = asyncio.Event()
        self._secure: SecureUploads | None = None
        """Made when an aggregator first announces secure aggregation (:meth:`_secure_uploads`)."""
        self._sa_inbox: asyncio.Queue[bytes] = asyncio.Queue(maxsize=256)
        self._sa_changed = asyncio.Event()
        self._held_back: set[int] = set()
        self._warned_plain = False
        self.pulse = Pulse()
        """Notified after every publish, model received, reconnect and state change."""

    def _status(self, state: AgentState) -> bytes:
        return StatusMessage(
            self.agent_id,
            state,
            epsilon=self.trainer.epsilon,
            seq=self.trainer.seq,
            ts=time.time(),
            budget=self.config.privacy.epsilon_budget,
        ).to_bytes()

    def _undecodable(self, payload: bytes) -> str | None:
        """Why an outbox entry cannot be sent (None: it can): it must decode as one of our updates."""
        try:
            update = UpdateMessage.from_bytes(payload, self._limits)
        except DecodeError as exc:
            return str(exc)
        return None if update.agent_id == self.agent_id else f"it is agent {update.agent_id!r}'s"

    async def run(self, stop: asyncio.Event | None = None) -> AgentStats:
        """Connect, train and publish until ``stop`` is set or the agent is finished."""
        stop = stop or asyncio.Event()
        tolerate_aiomqtt_disconnect_race(asyncio.get_running_loop())
        delays = backoff(rng=self.rng)
        will = aiomqtt.Will(self.topics.status(self.agent_id), self._status("offline"), qos=1, retain=True)
        gave_up = False
        try:
            while not stop.is_set() and not gave_up:
                try:
                    async with asyncio.timeout(None) as grace:
                        async with aiomqtt.Client(
                            **client_kwargs(self.config.broker),
                            identifier=f"fedmq-{self.agent_id}",
                            will=will,
                            clean_session=True,
                        ) as client:
                            delays = backoff(rng=self.rng)  # connected: the next outage starts from a short delay
                            await self._session(client, stop, grace)
                            return self.stats
                except* aiomqtt.MqttError as group:
                    self.stats.reconnects += 1
                    self.pulse.notify()
                    delay = next(delays)
                    log.warning(
                        "agent %s: broker connection lost (%s); reconnecting in %.1f s",
                        self.agent_id,
                        describe_failure(group.exceptions[0], self.config.broker),
                        delay,
                    )
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(delay):
                            await stop.wait()
                except* TimeoutError:
                    log.warning("agent %s: the broker did not answer within the shutdown grace; stopped", self.agent_id)
                    gave_up = True
        finally:
            await self._abandon_training()
        return self.stats

    async def _abandon_training(self) -> None:
        """At the end: a local round still running is cancelled and waited for at most the grace period.

        The worker thread is a daemon: if it does not notice in time (one very long minibatch)
        the process exits without it, and what it had not released is lost, not released.
        """
        training = self._training
        if training is None or training.done():
            return
        if self._cancel is not None:
            self._cancel.set()
        await asyncio.wait([training], timeout=self.config.agent.shutdown_grace)
        if not training.done():
            log.warning("agent %s: the local round did not stop within the grace period; leaving it", self.agent_id)
        elif not training.cancelled() and isinstance(training.exception(), TrainingCancelled):
            self.stats.abandoned += 1  # nothing was released, no budget spent

    async def _session(self, client: aiomqtt.Client, stop: asyncio.Event, grace: asyncio.Timeout) -> None:
        await publish(client, self.topics.status(self.agent_id), self._status("online"), qos=1, retain=True)
        self._model_came = asyncio.Event()  # this session's: set by the first model it receives
        await subscribe(client, self.topics.model, qos=1)
        self.stats.state = "online"
        self.pulse.notify()
        await subscribe(client, self.topics.receipt(self.agent_id), qos=1)
        await subscribe(client, self.topics.secagg_down(self.agent_id), qos=1)
        if self._training is not None:  # a local round from the lost session: let it stage its update
            await asyncio.wait([self._training])
            if not self._training.cancelled() and self._training.exception() is not None:
                log.info("agent %s: the round of the lost session ended: %s", self.agent_id, self._training.exception())
            self._training = None
        self._sent_at.clear()  # a new session: everything without a receipt goes again
        await self._flush_outbox(client)
        final: AgentState = "stopped"
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._receive(client))
                tg.create_task(self._train_loop(client, stop))
                tg.create_task(self._resender(client))
                tg.create_task(self._heartbeat(client))
                tg.create_task(self._summarize())
                tg.create_task(self._secagg_loop(client))
                wait = self.config.agent.model_wait
                tg.create_task(
                    ask_for_retained(client, self.topics.model, self._model_came, wait=wait, on_ask=self._asking)
                )
                await self._watch(stop)  # in the body, not a child: see AggregatorService._session
        except* _Finished:
            final = "budget_exhausted" if self.trainer.exhausted is not None else "stopped"
        except* _Stopped:
            final = "stopped"
        # Finishing: the goodbye and the disconnect are bounded, whatever the broker does.
        grace.reschedule(asyncio.get_running_loop().time() + self.config.agent.shutdown_grace)
        self.stats.state = final
        self.stats.epsilon = self.trainer.epsilon
        await publish(client, self.topics.status(self.agent_id), self._status(final), qos=1, retain=True)
        self.pulse.notify()

    @staticmethod
    async def _watch(stop: asyncio.Event) -> None:
        await stop.wait()
        raise _Stopped

    async def _receive(self, client: aiomqtt.Client) -> None:
        receipts = self.topics.receipt(self.agent_id)
        secagg = self.topics.secagg_down(self.agent_id)
        async for msg in client.messages:
            if not isinstance(msg.payload, (bytes, bytearray)):
                continue
            if msg.topic.matches(receipts):
                self._on_receipt(bytes(msg.payload))
                continue
            if msg.topic.matches(secagg):
                try:
                    self._sa_inbox.put_nowait(bytes(msg.payload))
                except asyncio.QueueFull:
                    self.stats.secure.ignored["overload"] += 1
                continue
            if not msg.topic.matches(self.topics.model):
                continue
            try:
                model = ModelMessage.from_bytes(bytes(msg.payload), self._limits)
            except DecodeError as exc:
                self.stats.bad_models += 1
                log.warning("agent %s: ignoring a bad global model: %s", self.agent_id, exc)
                continue
            self.stats.models_received += 1
            self._model_came.set()
            self._follow(model)
            self.pulse.notify()
            if self.on_model is not None and not self._on_model_busy:
                self._on_model_busy = True
                self._hook_task = asyncio.get_running_loop().create_task(self._run_on_model(model))  # keep a ref

    def _follow(self, model: ModelMessage) -> None:
        """Train on ``model`` from now on: the aggregator's newest word, whatever its version.

        MQTT delivers one publisher's messages on a topic in order, so a lower version than
        before means the aggregator went back (a restored backup, a recovery): ignoring it would
        stall this agent for good. A model of another run also drops what the outbox holds for
        the old one: the aggregator cannot use it.
        """
        latest = self._latest
        if model.run != self._run:
            if latest is not None:
                log.warning(
                    "agent %s: the aggregator runs %s now (was %s, at version %d): following it",
                    self.agent_id,
                    model.run,
                    self._run,
                    latest.version,
                )
            self._run = model.run
            self._drop_other_runs(model.run)
            if self._training is not None and not self._training.done() and self._cancel is not None:
                self._cancel.set()  # a round on the old run would be refused: abandon it before its release
        elif latest is not None and model.version < latest.version:
            log.warning(
                "agent %s: the model went back from version %d to %d (the aggregator's state was rolled back): "
                "following it",
                self.agent_id,
                latest.version,
                model.version,
            )
        self._latest = model
        if self._blocked is not None and self._blocked != (model.run, model.version):
            self._blocked = None
        self._new_model.set()

    def _drop_other_runs(self, run: str | None) -> None:
        if run is None:
            return
        dropped = self.stats.dropped_other_run
        for seq, payload in self.outbox.pending():
            try:
                base_run = UpdateMessage.from_bytes(payload, self._limits).base_run
            except DecodeError:
                continue
            if base_run is not None and base_run != run:
                self.outbox.remove(seq)
                self._sent_at.pop(seq, None)
                self._ever_sent.discard(seq)
                self.stats.dropped_other_run += 1
                log.info("agent %s: update %d was trained on run %s: dropped, not sent", self.agent_id, seq, base_run)
        if self.stats.dropped_other_run > dropped:
            self._receipt.set()  # room in a full outbox: a train loop held back by it goes on now

    def _on_receipt(self, payload: bytes) -> None:
        try:
            receipt = ReceiptMessage.from_bytes(payload, self._limits)
        except DecodeError as exc:
            log.warning("agent %s: ignoring a bad receipt: %s", self.agent_id, exc)
            return
        if receipt.agent_id != self.agent_id or receipt.seq not in self.outbox:
            return  # not ours, or a second receipt for a re-sent update
        if receipt.status == "retry":  # not now: keep it, send it again when due, train nothing new meanwhile
            wait = receipt.retry_after if receipt.retry_after is not None else 1.0
            self._sent_at[receipt.seq] = time.monotonic() - self.config.agent.receipt_timeout + wait
            self._pause_until = max(self._pause_until, time.monotonic() + wait)
            self.stats.retries += 1
            self._resend_wanted.set()
            self.pulse.notify()
            return
        payload = self.outbox.get(receipt.seq) or b""
        self.outbox.remove(receipt.seq)
        if self._secure is not None:
            self._secure.settled(receipt.seq, time.monotonic(), accepted=receipt.status == "accepted")
        self._sa_changed.set()
        if self.on_receipt is not None:
            self.on_receipt(receipt, payload)
        self._sent_at.pop(receipt.seq, None)
        self._ever_sent.discard(receipt.seq)
        if receipt.status == "accepted":
            self.stats.receipts_accepted += 1
        else:
            self.stats.receipts_rejected += 1
            log.info(
                "agent %s: update %d rejected: %s%s",
                self.agent_id,
                receipt.seq,
                receipt.reason,
                f" ({receipt.detail})" if receipt.detail else "",
            )
            if receipt.reason in UNKNOWN_BASE:
                self._block_base(payload)
        self._receipt.set()
        self.pulse.notify()

    def _block_base(self, payload: bytes) -> None:
        """The aggregator does not know the model this update was trained on: train no more on it."""
        try:
            update = UpdateMessage.from_bytes(payload, self._limits)
        except DecodeError:
            return
        latest = self._latest
        if latest is not None and (update.base_run, update.base_version) == (latest.run, latest.version):
            self._blocked = (latest.run, latest.version)
            log.warning(
                "agent %s: the aggregator does not know model version %d of run %s: waiting for one it knows",
                self.agent_id,
                latest.version,
                latest.run,
            )

    async def _flush_outbox(self, client: aiomqtt.Client) -> None:
        """Publish every outbox entry not sent in this session, or sent longer ago than the receipt timeout."""
        timeout = self.config.agent.receipt_timeout
        if self._secure_mode():
            return  # under secure aggregation updates leave only masked, in a cohort
        async with self._flush_lock:  # the train loop and the resender never send the same seq twice
            for seq, payload in self.outbox.pending():
                sent = self._sent_at.get(seq)
                if sent is not None and time.monotonic() - sent < timeout:
                    continue
                self._sent_at[seq] = time.monotonic()
                await publish(client, self.topics.update(self.agent_id), payload, qos=1)
                if seq in self._ever_sent:
                    self.stats.resent += 1
                else:
                    self._ever_sent.add(seq)
                    self.stats.updates_published += 1
                self.pulse.notify()

    def _refuses(self, model: ModelMessage) -> str | None:
        """Why this agent sends nothing under ``model``'s announcement (None: it takes part)."""
        if model.secagg is None and self.config.agent.require_secure_aggregation:
            return "the aggregator does not announce secure aggregation and agent.require_secure_aggregation is set"
        if self.config.privacy.require_distributed and (model.secagg is None or not model.secagg.distributed_dp):
            return "the aggregator does not announce distributed DP and privacy.require_distributed is set"
        return None

    def _secure_mode(self) -> bool:
        return self._latest is not None and self._latest.secagg is not None

    def _secure_uploads(self) -> SecureUploads:
        """The agent's cohort sessions, made once (signing with the TLS key, checking against the CA)."""
        if self._secure is None:
            from edge_agent.secure import SecureUploads, signing_identity

            b = self.config.broker
            try:
                signer, verifier = signing_identity(b.cert_file, b.key_file, b.ca_file)
            except (OSError, ValueError) as exc:
                raise ConfigError("broker.cert_file", f"cannot sign secure-aggregation keys with it: {exc}") from None
            self._secure = SecureUploads(
                self.agent_id,
                self.outbox,
                self._limits,
                signer=signer,
                verifier=verifier,
                stats=self.stats.secure,
                checkin_interval=self.config.agent.checkin_interval,
                charge=self.trainer.charge_distributed,
                require_dp=self.config.privacy.require_distributed,
                doubt_timeout=self.config.agent.receipt_timeout,
            )
        return self._secure

    async def _secagg_loop(self, client: aiomqtt.Client) -> None:
        """Secure aggregation: check in, run the cohort's rounds, mask the update when asked.

        The protocol's decisions are :class:`~edge_agent.secure.SecureUploads`'; this loop only
        moves its messages, and masks (a few AES-CTR streams the size of the model) in a thread.
        """
        topic = self.topics.secagg_up(self.agent_id)
        interval = self.config.agent.checkin_interval
        while True:
            model = self._latest
            active = (
                model is not None
                and model.secagg is not None
                and self.trainer.exhausted is None
                and not self._draining.is_set()
                and self._refuses(model) is None
            )
            secure = self._secure_uploads() if active else self._secure
            if active:
                assert model is not None
                assert secure is not None
                checkin = secure.check_in(time.monotonic(), model)
                if checkin is not None:
                    await publish(client, topic, checkin.to_bytes(), qos=1)
                if secure.waiting_for_input:
                    picked = secure.input_for(model, skip=self._held_back)
                    if picked is not None:
                        try:
                            if picked[0].size >= INLINE_MASK_VALUES:
                                outs = await asyncio.to_thread(secure.provide, *picked, time.monotonic())
                            else:  # a small model: masking takes less than a thread hand-off
                                outs = secure.provide(*picked, time.monotonic())
                        except BudgetExhausted as exc:  # nothing was uploaded; the train loop finishes
                            log.warning("agent %s: %s", self.agent_id, exc)
                            self._sa_changed.set()
                            continue
                        await self._publish_secagg(client, outs)
                        self._sa_changed.set()
                    else:
                        self._sa_changed.set()  # the train loop makes one
            try:
                async with asyncio.timeout(interval):
                    payload = await self._sa_inbox.get()
            except TimeoutError:
                continue
            if not payload or secure is None:  # an update was staged: see whether the session waits for one
                continue
            outs = secure.on_message(payload, time.monotonic())
            await self._publish_secagg(client, outs)
            self._sa_changed.set()
            self.pulse.notify()

    def _wake_secagg(self) -> None:
        """Tell the secure-aggregation loop that an update is ready (an empty item in its inbox)."""
        if self._secure_mode():
            with contextlib.suppress(asyncio.QueueFull):
                self._sa_inbox.put_nowait(b"")

    async def _publish_secagg(self, client: aiomqtt.Client, outs: list[Output]) -> None:
        from edge_agent.secure import messages, wants_input

        for msg in messages(outs):
            await publish(client, self.topics.secagg_up(self.agent_id), msg.to_bytes(), qos=1)
            if msg.kind == "sa_masked":
                self.stats.updates_published += 1
        if wants_input(outs):
            self._sa_changed.set()

    def summary_line(self) -> str:
        """One line of what this agent did: for its log, every ``agent.summary_interval`` seconds."""
        s = self.stats
        eps = self.trainer.epsilon
        budget = self.config.privacy.epsilon_budget
        privacy = "no DP" if eps is None else f"epsilon {eps:.3g}" + (f" of {budget:g}" if budget is not None else "")
        return (
            f"agent {self.agent_id}: model version {s.last_version}, {s.updates_published} updates sent "
            f"({s.receipts_accepted} accepted, {s.receipts_rejected} rejected, {s.retries} retries, "
            f"{s.resent} re-sent), outbox {len(self.outbox)}, {privacy}, {s.state}"
        )

    async def _summarize(self) -> None:
        """The periodic INFO summary line (a device's operator reads its journal, not the metrics)."""
        while True:
            await asyncio.sleep(self.config.agent.summary_interval)
            log.info("%s", self.summary_line())

    async def _heartbeat(self, client: aiomqtt.Client) -> None:
        """Re-publish the retained ``online`` status now and then: proof of life beyond MQTT pings."""
        while True:
            await asyncio.sleep(self.config.agent.heartbeat_interval)
            await publish(client, self.topics.status(self.agent_id), self._status("online"), qos=1, retain=True)

    def _asking(self) -> None:
        """No global model yet in this session after ``agent.model_wait``: the model topic is subscribed again."""
        self.stats.model_asks += 1
        log.info("agent %s: no global model for %.0f s: subscribing again", self.agent_id, self.config.agent.model_wait)

    async def _resender(self, client: aiomqtt.Client) -> None:
        """Re-publish updates whose receipt is overdue (lost, the aggregator away) or whose retry is due."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._next_due()):
                    await self._resend_wanted.wait()
            self._resend_wanted.clear()
            await self._flush_outbox(client)

    def _next_due(self) -> float:
        """Seconds until the first update without a receipt is due to be sent again."""
        timeout = self.config.agent.receipt_timeout
        now = time.monotonic()
        dues = [self._sent_at[seq] + timeout - now for seq, _ in self.outbox.pending() if seq in self._sent_at]
        return max(0.05, min([timeout / 2, *dues]))

    async def _await_receipt(self, limit: float) -> None:
        self._receipt.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(limit):
                await self._receipt.wait()

    async def _run_on_model(self, model: ModelMessage) -> None:
        assert self.on_model is not None
        try:
            await asyncio.to_thread(self.on_model, model)
        except Exception as exc:  # a hook failure must not stop training
            log.warning("agent %s: model hook failed: %s", self.agent_id, exc)
        finally:
            self._on_model_busy = False

    async def _train_loop(self, client: aiomqtt.Client, stop: asyncio.Event) -> None:
        limit = self.config.agent.max_updates
        interval = self.config.agent.round_interval
        while True:
            if self.trainer.exhausted is not None:
                raise _Finished
            if self._draining.is_set():
                await self._drain_outbox()
                raise _Finished
            if self.outbox.full:  # back-pressure: no training while nothing can be delivered
                await self._await_receipt(self.config.agent.receipt_timeout)
                continue
            pause = self._pause_until - time.monotonic()
            if pause > 0:  # a retry receipt: the aggregator wants nothing new before then
                await asyncio.sleep(pause)
                continue
            model = self._latest
            if model is None or self._blocked is not None or not self.trainer.should_train(model):
                await self._new_model.wait()
                self._new_model.clear()
                continue
            if self._refuses(model):
                if not self._warned_plain:
                    self._warned_plain = True
                    self.pulse.notify()
                    log.warning("agent %s: %s: sending nothing", self.agent_id, self._refuses(model))
                await self._new_model.wait()
                self._new_model.clear()
                continue
            if model.secagg is not None and not self._secure_uploads().needs_update():
                # One update waits for a cohort: training more now would only make it staler.
                self._sa_changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.config.agent.checkin_interval):
                        await self._sa_changed.wait()
                continue
            self._new_model.clear()
            # A worker thread trains, encodes and stages the update as pending itself; it runs on
            # when a session dies meanwhile (broker gone), and the next session waits for it and
            # re-sends what is pending. At a stop it is told to abandon the round instead.
            self._training = self._start_training(model)
            try:
                await asyncio.shield(self._training)
            except asyncio.CancelledError:
                if stop.is_set() and self._cancel is not None:
                    self._cancel.set()
                raise
            except BudgetExhausted as exc:
                log.warning("agent %s: %s", self.agent_id, exc)
                raise _Finished from None
            except TrainingDiverged as exc:
                self.stats.diverged += 1
                log.warning("agent %s: %s", self.agent_id, exc)
                await self._new_model.wait()  # not the same version again: the next one (or finish())
                continue
            except TrainingCancelled:
                self.stats.abandoned += 1
                if stop.is_set():
                    raise _Finished from None
                continue  # the aggregator moved to another run meanwhile: train on its model
            finally:
                if self._training.done():
                    self._training = None
            if self.compute_delay is not None:
                await asyncio.sleep(self.compute_delay())
            self._held_back.clear()  # the (simulated) round is over: its update may go out
            self._wake_secagg()
            await self._flush_outbox(client)
            if limit and self.stats.updates_published >= limit:
                await self._drain_outbox()
                raise _Finished
            if interval > 0:
                await asyncio.sleep(interval)

    def _start_training(self, model: ModelMessage) -> asyncio.Future[None]:
        """Train in a daemon thread (so that an exiting process never waits for a round); a future for the result."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        cancel = self._cancel = threading.Event()

        def settle(error: BaseException | None) -> None:
            if done.cancelled():
                return
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)

        def work() -> None:
            error: BaseException | None = None
            try:
                self._train_and_stage(model, cancel)
            except BaseException as exc:  # handed to the event loop, which decides
                error = exc
            with contextlib.suppress(RuntimeError):  # the loop is gone: the process is exiting
                loop.call_soon_threadsafe(settle, error)

        # A round that outlives the session that started it (a stop, a lost broker) may end with
        # nobody awaiting it; its outcome is logged here, and still raised to whoever awaits it.
        done.add_done_callback(self._round_ended)
        threading.Thread(target=work, name=f"fedmq-train-{self.agent_id}", daemon=True).start()
        return done

    def _round_ended(self, done: asyncio.Future[None]) -> None:
        if not done.cancelled() and isinstance(done.exception(), TrainingCancelled):
            log.debug("agent %s: a local round was abandoned before its release", self.agent_id)

    def finish(self, wait: float | None = None) -> None:
        """Train no more; deliver what is in the outbox, then stop.

        Receipts are awaited at most ``wait`` seconds (default: the receipt timeout).
        """
        self._drain_wait = wait
        self._draining.set()
        self._new_model.set()  # wake a train loop that waits for a model

    async def _drain_outbox(self) -> None:
        """Before finishing, wait (bounded) for the receipts still due."""
        wait = self._drain_wait if self._drain_wait is not None else self.config.agent.receipt_timeout
        deadline = time.monotonic() + wait
        while len(self.outbox) and time.monotonic() < deadline:
            await self._await_receipt(deadline - time.monotonic())

    def _train_and_stage(self, model: ModelMessage, cancel: threading.Event) -> None:
        """Worker thread: train, encode, put in the outbox (durably with a state dir) before any publish."""
        log.debug("agent %s: a local round on version %d begins", self.agent_id, model.version)
        update = self.trainer.train(model, cancel=cancel)
        floor = min([seq for seq, _ in self.outbox.pending()] + [update.seq])
        update = dataclasses.replace(update, oldest_pending=floor)  # lets the aggregator forget the rest
        if self.compute_delay is not None:
            self._held_back.add(update.seq)  # a simulated slower device: not before its delay is over
        self.outbox.put(update.seq, update.to_bytes())
        self.stats.last_version = model.version
        self.stats.epsilon = update.epsilon
