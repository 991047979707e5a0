"""Helpers for broker tests: wait on messages and on the services' readiness pulses, never on sleeps."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiomqtt

from aggregator.service import AggregatorService
from fedmq.config import Config
from fedmq.runtime import Pulse


async def wait_for_message(
    host: str, port: int, topic: str, predicate: Callable[[aiomqtt.Message], bool], limit: float = 20.0
) -> aiomqtt.Message:
    """Subscribe to ``topic`` and return the first message for which ``predicate`` holds."""
    async with aiomqtt.Client(host, port) as client:
        await client.subscribe(topic, qos=1)
        async with asyncio.timeout(limit):
            async for msg in client.messages:
                if predicate(msg):
                    return msg
    raise AssertionError("unreachable")


async def wait_until(pulse: Pulse, condition: Callable[[], bool], limit: float = 20.0) -> None:
    """Wait, at most ``limit`` seconds, until a service's state satisfies ``condition``."""
    async with asyncio.timeout(limit):
        await pulse.wait_for(condition)


def payload(msg: aiomqtt.Message) -> bytes:
    """The payload as bytes."""
    assert isinstance(msg.payload, (bytes, bytearray))
    return bytes(msg.payload)


async def start_aggregator(cfg: Config) -> tuple[AggregatorService, asyncio.Event, asyncio.Task[dict[str, Any]]]:
    """An aggregator running on this loop, returned once it is subscribed: (service, stop, task)."""
    server = AggregatorService(cfg)
    stop = asyncio.Event()
    task = asyncio.create_task(server.run(stop))
    await asyncio.wait_for(server.ready.wait(), 20)
    return server, stop, task
