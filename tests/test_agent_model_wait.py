"""Tier 2: an agent asks for the retained model again when none came (``agent.model_wait``).

A NATS cluster keeps retained messages eventually consistent: a device that subscribes on one
node just after the model was written on another can subscribe before that node holds it, and
is not sent it when it arrives. The client here behaves that way: its first SUBSCRIBE to the
model topic finds nothing retained, a later one finds the model. The agent's own ``_receive``
and the asking loop it runs beside it (``runtime.transport.ask_for_retained``, which a site
over MQTT runs for the root's model too) run against it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiomqtt
import numpy as np
import pytest

from edge_agent.service import AgentService
from edge_agent.trainer import LocalTrainer
from fedmq.config import AgentConfig, Config, PrivacyConfig
from fedmq.errors import ConfigError
from fedmq.messages import ModelMessage, ModelSpec
from models import create_model
from models.datasets import digits
from runtime.transport import ask_for_retained


class LaggingRetainedStore:
    """The subscribe and receive sides of an MQTT client on a node whose retained store lags:
    the model is retained only from the ``holds_from``-th SUBSCRIBE to its topic on."""

    def __init__(self, model_topic: str, model: bytes, holds_from: int) -> None:
        self.model_topic, self.model, self.holds_from = model_topic, model, holds_from
        self.asks = 0
        self._inbox: asyncio.Queue[aiomqtt.Message] = asyncio.Queue()

    async def subscribe(self, topic: str, qos: int = 0) -> None:
        if topic != self.model_topic:
            return
        self.asks += 1
        if self.asks >= self.holds_from:  # a broker sends what it retains on every SUBSCRIBE
            self._inbox.put_nowait(aiomqtt.Message(topic, self.model, 1, True, self.asks, None))

    @property
    def messages(self) -> AsyncIterator[aiomqtt.Message]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[aiomqtt.Message]:
        while True:
            yield await self._inbox.get()


def agent(model_wait: float) -> AgentService:
    acfg = AgentConfig(agent_id="pi", model_wait=model_wait)
    train, _ = digits()
    trainer = LocalTrainer(
        acfg, PrivacyConfig(enabled=False), train.subset(np.arange(40)), rng=np.random.default_rng(0)
    )
    return AgentService(Config(prefix="fedmq/t", agent=acfg).validate(), trainer)


async def ask(svc: AgentService, client: LaggingRetainedStore) -> None:
    """What the agent's session runs beside its receive loop."""
    wait = svc.config.agent.model_wait
    await ask_for_retained(client, svc.topics.model, svc._model_came, wait=wait, on_ask=svc._asking)  # type: ignore[arg-type]


def model_bytes() -> bytes:
    weights = create_model("softmax", num_features=64, num_classes=10).get_weights()
    return ModelMessage(0, ModelSpec("softmax", 64, 10), weights).to_bytes()


@pytest.mark.parametrize("holds_from", [2, 4])
async def test_an_agent_subscribes_again_until_the_retained_model_comes_then_stops_asking(holds_from: int) -> None:
    svc = agent(model_wait=0.2)
    client = LaggingRetainedStore(svc.topics.model, model_bytes(), holds_from)
    await client.subscribe(svc.topics.model, qos=1)  # the session's own subscription: nothing retained yet
    receiving = asyncio.create_task(svc._receive(client))  # type: ignore[arg-type]
    try:
        async with asyncio.timeout(60):
            await ask(svc, client)  # returns once a model came
        assert svc.stats.models_received == 1
        assert svc.stats.model_asks == holds_from - 1
        assert client.asks == holds_from
        assert svc._latest is not None and svc._latest.version == 0
    finally:
        receiving.cancel()


async def test_an_agent_that_got_its_model_does_not_ask_again() -> None:
    svc = agent(model_wait=0.2)
    client = LaggingRetainedStore(svc.topics.model, model_bytes(), holds_from=1)
    receiving = asyncio.create_task(svc._receive(client))  # type: ignore[arg-type]
    try:
        asking = asyncio.create_task(ask(svc, client))
        await client.subscribe(svc.topics.model, qos=1)  # the session's subscription finds the model
        async with asyncio.timeout(60):
            await asking
        assert (svc.stats.models_received, svc.stats.model_asks, client.asks) == (1, 0, 1)
    finally:
        receiving.cancel()


def test_model_wait_must_be_a_positive_number_of_seconds() -> None:
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ConfigError) as err:
            AgentConfig(agent_id="pi", model_wait=bad).validate()
        assert err.value.key == "agent.model_wait"
