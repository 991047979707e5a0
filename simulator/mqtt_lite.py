"""A minimal MQTT 3.1.1 client connection for simulating thousands of devices in one process.

A real ``fedmq agent`` uses aiomqtt; at fleet scale (10,000 connections in one process) each
aiomqtt client's own tasks, timers and paho machinery cost too much. This is an
``asyncio.Protocol``: one TCP connection, packets parsed in ``data_received``, no task, timer
or thread of its own. Whoever drives a fleet owns the one scheduler (see
:mod:`simulator.fleet`). It speaks what the fleet needs: CONNECT (with a Will), SUBSCRIBE,
PUBLISH at QoS 0/1 in both directions, PUBACK, PINGREQ. It is for the simulator, not for
devices: no TLS, no reconnect, no MQTT 5.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable

OnPublish = Callable[["LiteConnection", str, bytes], None]

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK, PINGREQ, PINGRESP = 1, 2, 3, 4, 8, 9, 12, 13


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return struct.pack(">H", len(raw)) + raw


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _remaining_length(len(body)) + body


class MQTTLiteError(Exception):
    """The broker refused or dropped the connection."""


class LiteConnection(asyncio.Protocol):
    """One MQTT connection; ``on_publish(conn, topic, payload)`` gets every incoming PUBLISH."""

    def __init__(self, client_id: str, on_publish: OnPublish) -> None:
        self.client_id = client_id
        self.on_publish = on_publish
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._next_id = 0
        self._waiting: dict[tuple[int, int], asyncio.Future[None]] = {}
        self.connack: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.unacked = 0
        """QoS-1 publishes sent and not yet acknowledged."""

    # -- asyncio.Protocol --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # noqa: D102
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: D102
        err = MQTTLiteError(f"{self.client_id}: connection lost ({exc})")
        for fut in [self.connack, *self._waiting.values()]:
            if not fut.done():
                fut.set_exception(err)
        self._waiting.clear()
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:  # noqa: D102
        buf = self._buf
        buf += data
        pos = 0
        while True:
            # fixed header: type/flags byte, then 1-4 bytes of remaining length
            if len(buf) - pos < 2:
                break
            length, mult, i = 0, 1, pos + 1
            while True:
                if i >= len(buf):
                    length = -1
                    break
                byte = buf[i]
                length += (byte & 0x7F) * mult
                mult *= 128
                i += 1
                if not byte & 0x80:
                    break
                if i - pos > 4:
                    raise MQTTLiteError("malformed remaining length")
            if length < 0 or len(buf) - i < length:
                break
            self._handle(buf[pos], bytes(buf[i : i + length]))
            pos = i + length
        if pos:
            del buf[:pos]

    def _handle(self, first: int, body: bytes) -> None:
        kind = first >> 4
        if kind == PUBLISH:
            qos = (first >> 1) & 3
            (tlen,) = struct.unpack_from(">H", body)
            topic = body[2 : 2 + tlen].decode()
            at = 2 + tlen
            if qos:
                (pid,) = struct.unpack_from(">H", body, at)
                at += 2
                self._send(_packet(PUBACK << 4, struct.pack(">H", pid)))
            self.on_publish(self, topic, body[at:])
        elif kind == PUBACK:
            (pid,) = struct.unpack_from(">H", body)
            self.unacked -= 1
            self._resolve(PUBACK, pid)
        elif kind == CONNACK:
            if body[1] != 0:
                self.connack.set_exception(MQTTLiteError(f"{self.client_id}: CONNACK return code {body[1]}"))
            elif not self.connack.done():
                self.connack.set_result(None)
        elif kind == SUBACK:
            (pid,) = struct.unpack_from(">H", body)
            if any(code == 0x80 for code in body[2:]):
                fut = self._waiting.pop((SUBACK, pid), None)
                if fut is not None and not fut.done():
                    fut.set_exception(MQTTLiteError(f"{self.client_id}: subscription refused"))
                return
            self._resolve(SUBACK, pid)

    def _resolve(self, kind: int, pid: int) -> None:
        fut = self._waiting.pop((kind, pid), None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _send(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            raise MQTTLiteError(f"{self.client_id}: not connected")
        self.transport.write(data)

    def _packet_id(self) -> int:
        self._next_id = self._next_id % 65535 + 1
        return self._next_id

    # -- requests ----------------------------------------------------------------------------
    def connect(
        self, *, keepalive: int = 600, will: tuple[str, bytes, bool] | None = None, clean_session: bool = True
    ) -> asyncio.Future[None]:
        """Send CONNECT; the returned future resolves on CONNACK."""
        flags = 0x02 if clean_session else 0
        payload = _str(self.client_id)
        if will is not None:
            topic, message, retain = will
            flags |= 0x04 | (0x20 if retain else 0) | (1 << 3)  # Will at QoS 1
            payload += _str(topic) + _str(message)
        head = _str("MQTT") + bytes([4, flags]) + struct.pack(">H", keepalive)
        self._send(_packet(CONNECT << 4, head + payload))
        return self.connack

    def subscribe(self, topics: list[tuple[str, int]]) -> asyncio.Future[None]:
        """Send SUBSCRIBE; the returned future resolves on a SUBACK granting every topic."""
        pid = self._packet_id()
        body = struct.pack(">H", pid) + b"".join(_str(t) + bytes([q]) for t, q in topics)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[(SUBACK, pid)] = fut
        self._send(_packet((SUBSCRIBE << 4) | 0x02, body))
        return fut

    def publish(self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False) -> None:
        """Send PUBLISH without waiting (QoS 1: :attr:`unacked` counts it until its PUBACK)."""
        first = (PUBLISH << 4) | (qos << 1) | (1 if retain else 0)
        body = _str(topic)
        if qos:
            body += struct.pack(">H", self._packet_id())
            self.unacked += 1
        self._send(_packet(first, body + payload))

    def ping(self) -> None:
        """Send PINGREQ (keeps an idle connection alive past its keepalive)."""
        self._send(bytes([PINGREQ << 4, 0]))

    def close(self) -> None:
        """Send DISCONNECT and close (a clean disconnect: the broker does not send the Will)."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(bytes([0xE0, 0]))
            self.transport.close()
