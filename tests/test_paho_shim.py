"""The one-copy PUBLISH decoder gives exactly what paho's own gives (runtime/paho_shim.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt import _packet
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.exception import MalformedPacket

from runtime import paho_shim

paho_shim.install()
ORIGINAL = _packet.decode_publish.original  # type: ignore[attr-defined]
V311 = MQTTProtocolVersion.MQTTv311


def publish_packet(topic: bytes, mid: int | None, payload: bytes) -> bytes:
    head = len(topic).to_bytes(2, "big") + topic
    return head + (mid.to_bytes(2, "big") if mid is not None else b"") + payload


@given(
    topic=st.binary(min_size=1, max_size=70),
    qos=st.integers(0, 2),
    flags=st.integers(0, 15),
    mid=st.integers(0, 65535),
    payload=st.binary(max_size=300),
)
def test_equal_to_paho_on_well_formed_packets(topic: bytes, qos: int, flags: int, mid: int, payload: bytes) -> None:
    header = 0x30 | (flags & 0x09) | (qos << 1)
    packet = bytearray(publish_packet(topic, mid if qos else None, payload))
    assert _packet.decode_publish(header, packet, V311) == ORIGINAL(header, bytearray(packet), V311)


@given(header=st.integers(0x30, 0x3F), packet=st.binary(max_size=40))
def test_equal_to_paho_on_any_bytes_or_both_refuse(header: int, packet: bytes) -> None:
    try:
        theirs = ORIGINAL(header, bytearray(packet), V311)
    except MalformedPacket:
        with pytest.raises(MalformedPacket):
            _packet.decode_publish(header, bytearray(packet), V311)
        return
    assert _packet.decode_publish(header, bytearray(packet), V311) == theirs


def test_a_large_payload_is_bytes_of_its_own() -> None:
    payload = bytes(range(256)) * 16384  # 4 MiB
    packet = bytearray(publish_packet(b"fedmq/x/update/a", 7, payload))
    got = _packet.decode_publish(0x32, packet, V311)
    packet[-1] ^= 0xFF  # paho reuses nothing, but the payload must not be a view of its buffer
    assert type(got.payload) is bytes and got.payload == payload and got.mid == 7 and got.qos == 1
