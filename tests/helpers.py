"""Helpers for broker tests: wait on messages and on the services' readiness pulses, never on sleeps."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import aiomqtt

from aggregator.service import AggregatorService
from broker.launcher import DEV_CONF, MosquittoBroker, free_port
from broker.pki import init
from fedmq.config import Config
from runtime.process import Pulse


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


@contextlib.contextmanager
def tls_deployment(agents: Sequence[str], prefix: str) -> Iterator[tuple[Path, MosquittoBroker]]:
    """A ``fedmq broker init`` deployment for ``agents`` and a Mosquitto serving it on free loopback ports.

    Mosquitto started as root reads its files as user mosquitto: the folder must be reachable
    (pytest's tmp_path is 0700). The secrets inside stay 0640, group mosquitto.
    """
    from tests.conftest import require_mosquitto

    require_mosquitto()
    root = Path(tempfile.mkdtemp(prefix="fedmq-pki-"))
    root.chmod(0o755)
    port, ops = free_port(), free_port()
    init(root, list(agents), prefix=prefix, port=port, ops_port=ops, bind="127.0.0.1")
    broker = MosquittoBroker(port=port, conf=root / "broker" / "mosquitto.conf", render=False, workdir=root / "run")
    broker.start()
    try:
        yield root, broker
    finally:
        broker.stop()
        shutil.rmtree(root, ignore_errors=True)


def tracing_mosquitto(workdir: Path) -> MosquittoBroker:
    """A started Mosquitto with the project's dev config and ``log_type all``: its log is a packet trace."""
    from tests.conftest import require_mosquitto

    require_mosquitto()
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "trace.conf"
    conf.write_text(DEV_CONF.read_text() + "log_type all\n")
    return MosquittoBroker(conf=conf, workdir=workdir).start()


def published_before_subscribing(log: Path, client: str, subscription: str, topic: str) -> list[str]:
    """From a :func:`tracing_mosquitto` log: each connection of ``client`` that published on
    ``topic`` before it subscribed to ``subscription`` (the lines in between); empty when none did."""
    found: list[str] = []
    subscribed, start = False, 0
    lines = log.read_text().splitlines()
    for i, line in enumerate(lines):
        if f"Sending CONNACK to {client} (" in line:
            subscribed, start = False, i
        elif line.endswith(f": {client} 1 {subscription}"):
            subscribed = True
        elif not subscribed and f"Received PUBLISH from {client} " in line and f"'{topic}'" in line:
            found.append("\n".join(lines[start : i + 1]))
            subscribed = True  # one report per connection
    return found


class StderrTap:
    """A child's stderr, line by line, into ``path`` and memory (own thread): a waiter is woken by each line."""

    def __init__(self, proc: subprocess.Popen[bytes], path: Path) -> None:
        assert proc.stderr is not None
        self.path = path
        self.lines: list[str] = []
        self.changed = threading.Condition()
        threading.Thread(target=self._pump, args=(proc.stderr,), daemon=True).start()

    def _pump(self, stream: Any) -> None:
        with open(self.path, "wb") as out:
            for line in iter(stream.readline, b""):
                out.write(line)
                out.flush()
                with self.changed:
                    self.lines.append(line.decode(errors="replace").lower())
                    self.changed.notify_all()

    def wait_for(self, text: str, limit: float) -> None:
        """Until a line holds ``text`` (lower case), at most ``limit`` seconds."""
        with self.changed:
            if not self.changed.wait_for(lambda: any(text in line for line in self.lines), timeout=limit):
                raise AssertionError(f"{text!r} not in {self.path} after {limit} s:\n{''.join(self.lines)[-2000:]}")
