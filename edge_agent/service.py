"""The edge agent's asyncio service: the only part of the agent that does I/O.

One ``aiomqtt.Client`` per agent (``async with``), an MQTT Will that marks the agent
``offline`` if it vanishes, the retained global model read with ``async for`` over
``client.messages``, training in a worker thread so the MQTT loop stays responsive, QoS 1
publishes, and reconnection with exponential backoff and jitter. An update whose publish
did not complete is kept and re-sent after the reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiomqtt

from edge_agent.pipeline import BudgetExhausted
from edge_agent.trainer import LocalTrainer
from fedmq.codec import DecodeLimits
from fedmq.config import Config
from fedmq.errors import ConfigError, DecodeError
from fedmq.messages import AgentState, ModelMessage, StatusMessage, UpdateMessage
from fedmq.runtime import Pulse
from fedmq.transport import backoff, client_kwargs, publish, subscribe

log = logging.getLogger("fedmq.agent")


@dataclass
class AgentStats:
    """What the agent did; returned by :meth:`AgentService.run`."""

    updates_published: int = 0
    models_received: int = 0
    bad_models: int = 0
    reconnects: int = 0
    last_version: int = -1
    epsilon: float | None = None
    state: str = "starting"


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
    """

    def __init__(
        self,
        config: Config,
        trainer: LocalTrainer,
        *,
        compute_delay: Callable[[], float] | None = None,
        rng: random.Random | None = None,
        on_model: Callable[[ModelMessage], None] | None = None,
    ) -> None:
        self.config = config
        self.trainer = trainer
        self.agent_id = config.agent.agent_id
        check_certificate_identity(config)
        self.topics = config.topics
        self.compute_delay = compute_delay
        self.on_model = on_model
        self._on_model_busy = False
        self._hook_task: asyncio.Task[None] | None = None
        self._training: asyncio.Future[None] | None = None
        self.rng = rng or random.Random()
        self.stats = AgentStats()
        self.pending: UpdateMessage | None = None
        self._pending_payload: bytes | None = None
        self._latest: ModelMessage | None = None
        self._new_model = asyncio.Event()
        self._limits = DecodeLimits(max_payload_bytes=config.broker.max_payload_bytes)
        self.pulse = Pulse()
        """Notified after every publish, model received, reconnect and state change."""

    def _status(self, state: AgentState) -> bytes:
        return StatusMessage(
            self.agent_id, state, epsilon=self.trainer.epsilon, seq=self.trainer.seq, ts=time.time()
        ).to_bytes()

    async def run(self, stop: asyncio.Event | None = None) -> AgentStats:
        """Connect, train and publish until ``stop`` is set or the agent is finished."""
        stop = stop or asyncio.Event()
        delays = backoff(rng=self.rng)
        will = aiomqtt.Will(self.topics.status(self.agent_id), self._status("offline"), qos=1, retain=True)
        while not stop.is_set():
            try:
                async with aiomqtt.Client(
                    **client_kwargs(self.config.broker),
                    identifier=f"fedmq-{self.agent_id}",
                    will=will,
                    clean_session=True,
                ) as client:
                    await self._session(client, stop)
                    return self.stats
            except* aiomqtt.MqttError as group:
                self.stats.reconnects += 1
                self.pulse.notify()
                delay = next(delays)
                log.warning(
                    "agent %s: broker connection lost (%s); reconnecting in %.1f s",
                    self.agent_id,
                    group.exceptions[0],
                    delay,
                )
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await stop.wait()
        return self.stats

    async def _session(self, client: aiomqtt.Client, stop: asyncio.Event) -> None:
        await publish(client, self.topics.status(self.agent_id), self._status("online"), qos=1, retain=True)
        await subscribe(client, self.topics.model, qos=1)
        self.stats.state = "online"
        self.pulse.notify()
        if self._training is not None:  # a local round from the lost session: let it stage its update
            await asyncio.wait([self._training])
            self._training = None
        if self.pending is not None:
            await self._publish_pending(client)
        final: AgentState = "stopped"
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._receive(client))
                tg.create_task(self._train_loop(client))
                await self._watch(stop)  # in the body, not a child: see AggregatorService._session
        except* _Finished:
            final = "budget_exhausted" if self.trainer.exhausted is not None else "stopped"
        except* _Stopped:
            final = "stopped"
        self.stats.state = final
        self.stats.epsilon = self.trainer.epsilon
        await publish(client, self.topics.status(self.agent_id), self._status(final), qos=1, retain=True)
        self.pulse.notify()

    @staticmethod
    async def _watch(stop: asyncio.Event) -> None:
        await stop.wait()
        raise _Stopped

    async def _receive(self, client: aiomqtt.Client) -> None:
        async for msg in client.messages:
            if not msg.topic.matches(self.topics.model) or not isinstance(msg.payload, (bytes, bytearray)):
                continue
            try:
                model = ModelMessage.from_bytes(bytes(msg.payload), self._limits)
            except DecodeError as exc:
                self.stats.bad_models += 1
                log.warning("agent %s: ignoring a bad global model: %s", self.agent_id, exc)
                continue
            self.stats.models_received += 1
            self.pulse.notify()
            if self._latest is None or model.version >= self._latest.version:
                self._latest = model
                self._new_model.set()
                if self.on_model is not None and not self._on_model_busy:
                    self._on_model_busy = True
                    self._hook_task = asyncio.get_running_loop().create_task(self._run_on_model(model))  # keep a ref

    async def _run_on_model(self, model: ModelMessage) -> None:
        assert self.on_model is not None
        try:
            await asyncio.to_thread(self.on_model, model)
        except Exception as exc:  # a hook failure must not stop training
            log.warning("agent %s: model hook failed: %s", self.agent_id, exc)
        finally:
            self._on_model_busy = False

    async def _train_loop(self, client: aiomqtt.Client) -> None:
        limit = self.config.agent.max_updates
        interval = self.config.agent.round_interval
        while True:
            if self.trainer.exhausted is not None:
                raise _Finished
            model = self._latest
            if model is None or not self.trainer.should_train(model):
                await self._new_model.wait()
                self._new_model.clear()
                continue
            self._new_model.clear()
            # The worker thread trains, encodes and stages the update as pending itself; the task is
            # shielded, so a session that dies meanwhile (broker gone) loses nothing: the next session
            # waits for it and re-sends what is pending.
            self._training = asyncio.ensure_future(asyncio.to_thread(self._train_and_stage, model))
            try:
                await asyncio.shield(self._training)
            except BudgetExhausted as exc:
                log.warning("agent %s: %s", self.agent_id, exc)
                raise _Finished from None
            finally:
                if self._training.done():
                    self._training = None
            if self.compute_delay is not None:
                await asyncio.sleep(self.compute_delay())
            await self._publish_pending(client)
            if limit and self.stats.updates_published >= limit:
                raise _Finished
            if interval > 0:
                await asyncio.sleep(interval)

    def _train_and_stage(self, model: ModelMessage) -> None:
        """Worker thread: train, encode, stage as pending (a crash of the session keeps it)."""
        update = self.trainer.train(model)
        self.pending, self._pending_payload = update, update.to_bytes()
        self.stats.last_version = model.version
        self.stats.epsilon = update.epsilon

    async def _publish_pending(self, client: aiomqtt.Client) -> None:
        """Publish the pending update at QoS 1; it is dropped only once the publish completed."""
        assert self.pending is not None
        assert self._pending_payload is not None
        await publish(client, self.topics.update(self.agent_id), self._pending_payload, qos=1)
        self.pending = self._pending_payload = None
        self.stats.updates_published += 1
        self.pulse.notify()
