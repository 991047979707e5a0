"""The aggregator's small HTTP endpoint: the dashboard, its JSON, Prometheus metrics and a health check.

A GET-only HTTP/1.1 server on asyncio streams (one request per connection, bounded request size
and time), so that the service needs no web framework:

* ``/``: the dashboard (one static page; it polls ``/api/state``);
* ``/api/state``: :meth:`aggregator.observe.Observatory.snapshot` as JSON;
* ``/metrics``: Prometheus' text format (prometheus_client, the ``server`` extra);
* ``/healthz``: 200 while the aggregator is connected to its broker, else 503.

It binds loopback by default: the dashboard shows agent ids and their epsilons, and nothing here
authenticates. To reach it from elsewhere, put it behind a reverse proxy with authentication.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from importlib import resources
from typing import Any

from fedmq.errors import ConfigError

log = logging.getLogger("fedmq.aggregator.http")
MAX_REQUEST_BYTES = 8192
REQUEST_TIMEOUT = 10.0


def dashboard_page() -> bytes:
    """The dashboard's HTML (package data)."""
    return resources.files("aggregator").joinpath("dashboard.html").read_bytes()


class HttpEndpoint:
    """Serves the routes above until closed.

    Args:
        host, port: where to listen (port 0: a free one; :attr:`port` tells which after start).
        state: returns the dashboard's JSON-able state.
        metrics: returns the Prometheus exposition and its content type (``None``: no /metrics).
        healthy: whether the service is connected to its broker.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        state: Callable[[], dict[str, Any]],
        metrics: Callable[[], tuple[bytes, str]] | None,
        healthy: Callable[[], bool],
    ) -> None:
        self.host, self.port = host, port
        self.state, self.metrics, self.healthy = state, metrics, healthy
        self._server: asyncio.Server | None = None
        self._page = dashboard_page()

    @property
    def url(self) -> str:
        """``http://host:port/``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    async def start(self) -> None:
        """Bind and listen; a busy port is a configuration error naming the key."""
        try:
            self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=MAX_REQUEST_BYTES)
        except OSError as exc:
            raise ConfigError(
                "aggregator.http", f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}"
            ) from None
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop listening and close open connections."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
                status, ctype, body = self._route(head)
                writer.write(
                    f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                    "Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass  # a client that went away or sent too much: nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _route(self, head: bytes) -> tuple[str, str, bytes]:
        try:
            method, target, _ = head.split(b"\r\n", 1)[0].decode("ascii").split(" ", 2)
        except (UnicodeDecodeError, ValueError):
            return "400 Bad Request", "text/plain", b"bad request\n"
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"GET only\n"
        path = target.split("?", 1)[0]
        if path in ("/", "/index.html"):
            return "200 OK", "text/html; charset=utf-8", self._page
        if path == "/api/state":
            return "200 OK", "application/json", json.dumps(self.state(), allow_nan=False).encode()
        if path == "/metrics" and self.metrics is not None:
            body, ctype = self.metrics()
            return "200 OK", ctype, body
        if path == "/healthz":
            ok = self.healthy()
            return ("200 OK" if ok else "503 Service Unavailable"), "text/plain", b"ok\n" if ok else b"not connected\n"
        return "404 Not Found", "text/plain", b"not found\n"
