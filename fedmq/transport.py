"""Connection settings shared by the agent and the aggregator (aiomqtt, never paho callbacks)."""

from __future__ import annotations

import random
import ssl
from collections.abc import Iterator
from typing import Any

from fedmq.config import BrokerConfig


def client_kwargs(broker: BrokerConfig) -> dict[str, Any]:
    """Keyword arguments for :class:`aiomqtt.Client` from the broker section of the config."""
    kwargs: dict[str, Any] = {
        "hostname": broker.host,
        "port": broker.port,
        "keepalive": broker.keepalive,
        "username": broker.username,
        "password": broker.password,
    }
    if broker.tls:
        ctx = ssl.create_default_context(cafile=broker.ca_file)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if broker.cert_file and broker.key_file:
            ctx.load_cert_chain(broker.cert_file, broker.key_file)
        kwargs["tls_context"] = ctx
    return kwargs


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
