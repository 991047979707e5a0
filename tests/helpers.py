"""Helpers for broker tests: wait on messages (readiness), never on sleeps."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiomqtt


async def wait_for_message(host: str, port: int, topic: str, predicate: Callable[[aiomqtt.Message], bool],
                           timeout: float = 20.0) -> aiomqtt.Message:
    """Subscribe to ``topic`` and return the first message for which ``predicate`` holds."""
    async with aiomqtt.Client(host, port) as client:
        await client.subscribe(topic, qos=1)
        async with asyncio.timeout(timeout):
            async for msg in client.messages:
                if predicate(msg):
                    return msg
    raise AssertionError("unreachable")


async def wait_until(condition: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    """Poll an in-process condition on the event loop (cheap; the loop keeps serving meanwhile)."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


def payload(msg: aiomqtt.Message) -> bytes:
    assert isinstance(msg.payload, (bytes, bytearray))
    return bytes(msg.payload)


