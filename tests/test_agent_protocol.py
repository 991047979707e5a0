"""Tier 3: a real `AgentService` against a real Mosquitto, with the test playing the aggregator.

The agent must follow the aggregator: keep an update it is told to retry and send it again
when due (training nothing new meanwhile), follow a new run and drop the outbox updates trained
on the old one, follow a version that went back, and stop training on a base the aggregator
says it does not know.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import replace

import aiomqtt
import numpy as np
import pytest

from broker.launcher import MosquittoBroker
from edge_agent.service import AgentService
from edge_agent.trainer import LocalTrainer
from fedmq.config import AgentConfig, BrokerConfig, Config, PrivacyConfig
from fedmq.messages import ModelMessage, ModelSpec, ReceiptMessage, UpdateMessage
from models import create_model
from models.datasets import digits
from tests.helpers import payload

pytestmark = pytest.mark.broker
RUN_A, RUN_B = "a" * 32, "b" * 32


class FakeAggregator:
    """Publishes models and receipts; collects the agent's updates."""

    def __init__(self, client: aiomqtt.Client, cfg: Config) -> None:
        self.client = client
        self.topics = cfg.topics
        self.updates: list[UpdateMessage] = []
        self.arrived = asyncio.Event()
        self.weights = create_model("softmax", num_features=64, num_classes=10).get_weights()
        self.auto_accept = False
        self._receipted: set[int] = set()

    async def model(self, version: int, run: str) -> None:
        msg = ModelMessage(version, ModelSpec("softmax", 64, 10), self.weights, run=run)
        await self.client.publish(self.topics.model, msg.to_bytes(), qos=1, retain=True)

    async def receipt(self, u: UpdateMessage, status: str, **kw: object) -> None:
        r = ReceiptMessage(u.agent_id, u.seq, status, u.base_version, **kw)  # type: ignore[arg-type]
        if status != "retry":
            self._receipted.add(u.seq)
        await self.client.publish(self.topics.receipt(u.agent_id), r.to_bytes(), qos=1)

    async def accept_all(self) -> None:
        """From now on act like a healthy aggregator: accept every update, those already here too.

        (Without receipts a full outbox rightly holds training back until its re-sends are due.)
        """
        self.auto_accept = True
        for u in list(self.updates):
            if u.seq not in self._receipted:
                await self.receipt(u, "accepted", index=1)

    async def collect(self) -> None:
        async for msg in self.client.messages:
            update = UpdateMessage.from_bytes(payload(msg))
            self.updates.append(update)
            if self.auto_accept and update.seq not in self._receipted:
                await self.receipt(update, "accepted", index=1)
            self.arrived.set()

    async def next_update(self, limit: float = 30.0) -> UpdateMessage:
        seen = len(self.updates)
        async with asyncio.timeout(limit):
            while len(self.updates) <= seen:
                self.arrived.clear()
                await self.arrived.wait()
        return self.updates[seen]

    async def until(self, start: int, wanted: object, limit: float = 30.0) -> UpdateMessage:
        """The first update from index ``start`` on for which ``wanted(update)`` holds."""
        async with asyncio.timeout(limit):
            while True:
                for u in self.updates[start:]:
                    if wanted(u):  # type: ignore[operator]
                        return u
                start = len(self.updates)
                self.arrived.clear()
                await self.arrived.wait()

    async def quiet_for(self, seconds: float) -> list[UpdateMessage]:
        """What arrives within ``seconds`` (to show that nothing does: a bound, not a wait for readiness)."""
        seen = len(self.updates)
        await asyncio.sleep(seconds)
        return self.updates[seen:]


async def test_the_agent_follows_retries_runs_rollbacks_and_unknown_bases(
    mosquitto: MosquittoBroker, prefix: str
) -> None:
    cfg = Config(prefix=prefix, broker=BrokerConfig(host=mosquitto.host, port=mosquitto.port))
    acfg = AgentConfig(agent_id="pi", round_interval=0.0, receipt_timeout=30.0, outbox_max=4)
    train, _ = digits()
    data = train.subset(np.arange(40))
    trainer = LocalTrainer(acfg, PrivacyConfig(enabled=False), data, rng=np.random.default_rng(0))
    agent = AgentService(replace(cfg, agent=acfg), trainer)
    stop = asyncio.Event()
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as client:
        agg = FakeAggregator(client, cfg)
        await client.subscribe(cfg.topics.update("pi"), qos=1)
        collector = asyncio.create_task(agg.collect())
        await agg.model(5, RUN_A)
        task = asyncio.create_task(agent.run(stop))
        try:
            first = await agg.next_update()
            assert (first.base_version, first.base_run) == (5, RUN_A)
            # retry: kept, sent again after retry_after, and nothing new trained meanwhile
            # (round_interval=0: a round already under way when the receipt lands may still be sent)
            start = len(agg.updates)
            await agg.receipt(first, "retry", reason="rate_limited", retry_after=1.0)
            async with asyncio.timeout(30):
                await agent.pulse.wait_for(lambda: agent.stats.retries == 1)
            published_at_retry = agent.stats.updates_published
            again = await agg.until(start, lambda u: u.seq == first.seq)
            assert again.base_version == 5 and first.seq in agent.outbox
            assert agent.stats.updates_published - published_at_retry <= 1  # only the round in flight
            await agg.receipt(again, "accepted", index=1)
            newer = await agg.next_update()
            assert newer.seq > first.seq
            # a new run: outbox updates of the old one are dropped; new ones name the new run
            await agg.model(0, RUN_B)
            async with asyncio.timeout(30):
                while True:
                    u = await agg.next_update()
                    if u.base_run == RUN_B:
                        break
            assert u.base_version == 0
            assert agent.stats.dropped_other_run >= 1 and all(
                UpdateMessage.from_bytes(p).base_run == RUN_B for _, p in agent.outbox.pending()
            )
            # the aggregator does not know this base: no more training on it (no budget spent)
            await agg.receipt(u, "rejected", reason="unknown_base_version")
            async with asyncio.timeout(30):
                while agent._blocked is None:
                    await agent.pulse.wait_for(lambda: agent._blocked is not None)
            stray = await agg.quiet_for(1.5)  # what was trained before the refusal may still come
            assert all(s.base_version == 0 for s in stray) and len(stray) <= 2
            assert await agg.quiet_for(1.5) == []
            # a version it knows again: training resumes; then one lower (a restored backup) is followed
            await agg.accept_all()
            start = len(agg.updates)
            await agg.model(7, RUN_B)
            await agg.until(start, lambda u: u.base_version == 7)
            start = len(agg.updates)
            await agg.model(2, RUN_B)
            await agg.until(start, lambda u: u.base_version == 2)
        finally:
            stop.set()
            await task
            collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await collector
