"""One copy instead of three when paho decodes a large PUBLISH.

paho-mqtt 2.2's ``_packet.decode_publish`` splits a packet with ``struct.unpack(f"!H{n}s")``
three times (topic length, topic, packet id): each copies the rest of the packet, payload
included, into a new ``bytes``. For a 4 MB update that is 12 MB of fresh memory per message,
and on a VM fresh memory costs page faults: it was the largest single CPU cost of the
aggregator's ingest (``benchmarks/ingest.py``). :func:`install` replaces it, for MQTT 3.1.1
packets, with a decoder that reads the header through a memoryview and copies the payload
once; MQTT 5 packets (never sent by fedmq) still go to paho's own. The results are equal
(``tests/test_paho_shim.py`` compares both on generated packets), and a paho without this
module layout is left alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("fedmq.transport")

_installed = False


def decode_publish_3(header: int, packet: bytes | bytearray) -> tuple[bool, int, bool, bytes, int, bytes]:
    """``(dup, qos, retain, topic, mid, payload)`` of an MQTT 3.1.1 PUBLISH, as paho decodes it.

    Raises ``ValueError`` for a packet too short for what its header says (paho raises
    ``MalformedPacket`` from its struct errors; the caller maps it the same way).
    """
    view = memoryview(packet)
    qos = (header & 0x06) >> 1
    if len(view) < 2:
        raise ValueError("PUBLISH shorter than its topic length")
    slen = (view[0] << 8) | view[1]
    pos = 2 + slen
    if len(view) < pos:
        raise ValueError("PUBLISH shorter than its topic")
    topic = bytes(view[2:pos])
    mid = 0
    if qos > 0:
        if len(view) < pos + 2:
            raise ValueError("PUBLISH shorter than its packet id")
        mid = (view[pos] << 8) | view[pos + 1]
        pos += 2
    return ((header & 0x08) != 0, qos, (header & 0x01) != 0, topic, mid, bytes(view[pos:]))


def install() -> bool:
    """Swap paho's PUBLISH decoder for the one-copy one (once); ``False`` if paho is laid out otherwise."""
    global _installed
    if _installed:
        return True
    try:
        from paho.mqtt import _packet
        from paho.mqtt.enums import MQTTProtocolVersion
        from paho.mqtt.exception import MalformedPacket
    except ImportError:
        return False
    original: Callable[..., Any] | None = getattr(_packet, "decode_publish", None)
    packet_type = getattr(_packet, "PublishPacket", None)
    if original is None or packet_type is None or getattr(packet_type, "_fields", None) != (
        "dup", "qos", "retain", "topic", "mid", "properties", "payload",
    ):  # fmt: skip
        log.debug("paho's PUBLISH decoder is not the one this shim knows: left as it is")
        return False

    def decode_publish(header: int, packet: bytes | bytearray, protocol: Any) -> Any:
        if protocol == MQTTProtocolVersion.MQTTv5:
            return original(header, packet, protocol)
        try:
            dup, qos, retain, topic, mid, payload = decode_publish_3(header, packet)
        except ValueError as exc:
            raise MalformedPacket(str(exc)) from exc
        if not topic:
            raise MalformedPacket("topic can't be empty in MQTTv3")
        return packet_type(dup=dup, qos=qos, retain=retain, topic=topic, mid=mid, properties=None, payload=payload)

    decode_publish.original = original  # type: ignore[attr-defined]
    _packet.decode_publish = decode_publish
    _installed = True
    return True
