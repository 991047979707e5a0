"""Connection settings shared by the agent and the aggregator (aiomqtt, never paho callbacks)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import random
import socket
import ssl
from collections.abc import Callable, Iterator
from typing import Any

import aiomqtt

from fedmq.config import BrokerConfig
from runtime import paho_shim

paho_shim.install()  # every fedmq client (agent, aggregator, tools) decodes PUBLISH with one copy

log = logging.getLogger("fedmq.transport")


def client_kwargs(broker: BrokerConfig) -> dict[str, Any]:
    """Keyword arguments for :class:`aiomqtt.Client` from the broker section of the config."""
    kwargs: dict[str, Any] = {
        "hostname": broker.host,
        "port": broker.port,
        "keepalive": broker.keepalive,
        "username": broker.username,
        "password": broker.password,
        # Without it paho's socket holds small packets (receipts, PUBACKs) back for Nagle's
        # algorithm: a receipt then waits on the peer's delayed ACK, about 40 ms.
        "socket_options": [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
    }
    if broker.tls or broker.ca_file or broker.cert_file:  # giving TLS material means TLS
        ctx = ssl.create_default_context(cafile=broker.ca_file)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if broker.cert_file and broker.key_file:
            ctx.load_cert_chain(broker.cert_file, broker.key_file)
        kwargs["tls_context"] = ctx
    return kwargs


def describe_failure(exc: BaseException, broker: BrokerConfig) -> str:
    """``exc`` (a failed connection) in words, with what to try when the cause is a common mistake.

    The classic one: ``mqtt://`` against a TLS listener, which Mosquitto answers by closing the
    connection (the client sees "Connection reset by peer" or a timeout, nothing about TLS).
    """
    text = str(exc) or type(exc).__name__
    cause = f"{exc.__context__}" if exc.__context__ is not None else ""
    both = f"{text} {cause}"
    where = f"{broker.host}:{broker.port}"
    if not broker.tls and any(s in both for s in ("reset by peer", "timed out", "Connection closed", "EOF")):
        hint = (
            f"if {where} is a TLS listener (8883, or one made by `fedmq broker init`), connect with "
            f"mqtts://{where} and --ca-file (plus --cert-file/--key-file for client certificates)"
        )
    elif broker.tls and any(s in both for s in ("WRONG_VERSION_NUMBER", "record layer failure", "wrong version")):
        hint = f"{where} does not speak TLS: if it is a plain listener, connect with mqtt://{where}"
    elif "CERTIFICATE_VERIFY_FAILED" in both:
        hint = f"the broker's certificate is not signed by --ca-file, or does not name {broker.host!r}"
    elif "refused" in both.lower() and "not authori" not in both.lower():
        hint = f"nothing accepts connections on {where}: is the broker running there?"
    elif "not authori" in both.lower() or "bad user name or password" in both.lower():
        hint = "the broker refused these credentials (user/password, or a certificate its ACL does not know)"
    else:
        return text
    return f"{text} ({hint})"


def backoff(initial: float = 0.2, maximum: float = 30.0, rng: random.Random | None = None) -> Iterator[float]:
    """Yield reconnect delays: exponential growth with "full jitter" (AWS architecture blog, 2015).

    The n-th delay is uniform in ``[0, min(maximum, initial * 2**n)]`` so that a fleet that
    lost the broker at the same moment does not reconnect in lockstep.
    """
    rng = rng or random.Random()
    ceiling = initial
    while True:
        yield rng.uniform(initial / 2, ceiling)
        ceiling = min(maximum, ceiling * 2)


def _reraise_swallowed_cancellation() -> None:
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def publish(client: aiomqtt.Client, topic: str, payload: bytes, *, qos: int, retain: bool = False) -> None:
    """``client.publish`` that never swallows a cancellation.

    aiomqtt waits for the PUBACK through ``asyncio.wait_for``, which on Python 3.11 drops a
    cancellation that arrives as the wait completes (CPython bpo-42130, fixed in 3.12): the
    cancelled task would then run on, and a TaskGroup waiting for it would wait forever.
    A task with a pending cancellation request gets its CancelledError here.
    """
    await client.publish(topic, payload, qos=qos, retain=retain)
    _reraise_swallowed_cancellation()


async def subscribe(client: aiomqtt.Client, topic: str, *, qos: int) -> None:
    """``client.subscribe`` that never swallows a cancellation (see :func:`publish`)."""
    await client.subscribe(topic, qos=qos)
    _reraise_swallowed_cancellation()


async def ask_for_retained(
    client: aiomqtt.Client, topic: str, came: asyncio.Event, *, wait: float, on_ask: Callable[[], None]
) -> None:
    """Subscribe to ``topic`` again every ``wait`` seconds until ``came`` is set (its retained message came).

    A broker sends the retained message on every SUBSCRIBE to its topic (MQTT 3.1.1, 3.8.4).
    One whose retained messages are eventually consistent (a NATS cluster, docs/scale-out.md)
    may not hold the message yet when a session subscribes, and does not send it when it
    arrives; it does on a later SUBSCRIBE. Run it beside the session's receive loop, which sets
    ``came``; ``on_ask`` is called before each new SUBSCRIBE (to count and log it).
    """
    while not came.is_set():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await came.wait()
        if came.is_set():
            return
        on_ask()
        await subscribe(client, topic, qos=1)


def tolerate_aiomqtt_disconnect_race(loop: asyncio.AbstractEventLoop) -> None:
    """Log aiomqtt's late write registration on a closed socket at DEBUG, not as an error.

    aiomqtt (2.5.1, the newest) queues ``loop.add_writer(fd, ...)`` from paho's callback with
    ``call_soon_threadsafe``. When the broker drops the connection first, the socket is closed
    before that runs, and asyncio's default handler logs "Exception in callback ... add_writer"
    with ``EBADF``: 30 lines of traceback per client at every broker restart. The client has
    already seen the disconnect (an ``MqttError``) and reconnects; nothing is lost. Everything
    else still goes to the default handler. A handler the application set is left alone.
    """
    if loop.get_exception_handler() is None:
        loop.set_exception_handler(_exception_handler)


def _exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    exc, handle = context.get("exception"), context.get("handle")
    if (
        isinstance(exc, OSError)
        and exc.errno == errno.EBADF
        and isinstance(handle, asyncio.Handle)
        and getattr(handle, "_callback", None) == loop.add_writer
    ):
        log.debug("a write registration for a socket closed before it ran (aiomqtt, at a disconnect): ignored")
        return
    loop.default_exception_handler(context)
