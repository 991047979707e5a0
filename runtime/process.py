"""Process lifecycle helpers shared by the services: logging, signals, graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import TypeVar

from fedmq.config import parse_broker_url

T = TypeVar("T")


def setup_logging(level: str = "INFO") -> None:
    """One log format for every fedmq process."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("amqtt", "transitions"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_until_signalled(main: Callable[[asyncio.Event], Awaitable[T]]) -> T:
    """Run ``main(stop)`` on a new event loop; SIGTERM and SIGINT set ``stop`` (graceful shutdown)."""

    async def runner() -> T:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):  # non-POSIX or not the main thread
                loop.add_signal_handler(sig, stop.set)
        return await main(stop)

    return asyncio.run(runner())


class Pulse:
    """Wakes waiters whenever its owner's observable state changes (a readiness signal, not a poll).

    The owner calls :meth:`notify` after each change; a waiter awaits :meth:`wait_for` with a
    predicate over the owner's state.
    """

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        """Wake every current waiter."""
        self._event.set()
        self._event = asyncio.Event()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Return once ``predicate()`` holds (checked after every notification)."""
        while not predicate():
            await self._event.wait()


def broker_url_overrides(url: str) -> dict[str, object]:
    """Config overrides from ``mqtt://[user[:password]@]host[:port]`` (``mqtts://`` turns TLS on)."""
    return {f"broker.{k}": v for k, v in parse_broker_url(url).items()}
