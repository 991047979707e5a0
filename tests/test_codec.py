"""Tier 1: the msgpack tensor codec and message schema, with golden bytes and hypothesis round-trips."""

from __future__ import annotations

import struct
import tracemalloc

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedmq import SCHEMA_VERSION
from fedmq.codec import DTYPES, DecodeLimits, decode_tensor, decode_tensors, encode_tensor, pack, unpack
from fedmq.errors import DecodeError, RejectReason
from fedmq.messages import ModelMessage, ModelSpec, StatusMessage, UpdateMessage, metrics_from_bytes, metrics_to_bytes
from tests.hostile import MARKER, Hostile, corpus, update_map

# {"dtype": "float32", "shape": [2], "data": bin(00 00 80 3f 00 00 00 c0)}: [1.0, -2.0] little-endian,
# written out by hand from the msgpack spec (fixmap 3, fixstr keys, fixarray shape, bin 8).
GOLDEN_TENSOR = bytes.fromhex(
    "83"
    "a5" + b"dtype".hex() + "a7" + b"float32".hex() + "a5" + b"shape".hex() + "9102"
    "a4" + b"data".hex() + "c408"
    "0000803f"
    "000000c0"
)

GOLDEN_UPDATE = bytes.fromhex(
    "8aa6736368656d6101a46b696e64a6757064617465a86167656e745f6964a26131a373657107ac626173655f76657273696f6e03ac6e"
    "756d5f6578616d706c65730ca7657073696c6f6ecb3ff8000000000000a773656e745f6174cb4059000000000000a564656c746181a1"
    "6283a56474797065a7666c6f61743332a573686170659102a464617461c4080000003f000080bfaa747261696e5f6c6f7373cb3fd000"
    "0000000000"
)
"""An update with ``train_loss`` (optional: agents send it only with ``agent.send_train_loss``) after the delta."""


def test_tensor_golden_bytes() -> None:
    assert pack(encode_tensor(np.array([1.0, -2.0], dtype=np.float32))) == GOLDEN_TENSOR
    arr = decode_tensor(unpack(GOLDEN_TENSOR), where="t")
    assert arr.dtype == np.float32 and arr.tolist() == [1.0, -2.0]


def test_update_golden_bytes_and_plain_msgpack_reader() -> None:
    u = UpdateMessage(
        agent_id="a1",
        seq=7,
        base_version=3,
        num_examples=12,
        delta={"b": np.array([0.5, -1.0], dtype=np.float32)},
        train_loss=0.25,
        epsilon=1.5,
        sent_at=100.0,
    )
    assert u.to_bytes() == GOLDEN_UPDATE
    # Any msgpack reader, with no fedmq code and no extension hooks, sees plain maps and bytes.
    plain = msgpack.unpackb(GOLDEN_UPDATE, raw=False)
    assert plain["schema"] == SCHEMA_VERSION and plain["kind"] == "update" and plain["seq"] == 7
    data = plain["delta"]["b"]["data"]
    assert struct.unpack("<2f", data) == (0.5, -1.0)
    back = UpdateMessage.from_bytes(GOLDEN_UPDATE)
    assert back.agent_id == "a1" and back.base_version == 3 and back.epsilon == 1.5
    np.testing.assert_array_equal(back.delta["b"], [0.5, -1.0])


def test_encode_packs_from_a_view_without_copying() -> None:
    arr = np.arange(1000, dtype=np.float32)
    wire = encode_tensor(arr)
    assert isinstance(wire["data"], memoryview)
    assert np.shares_memory(np.frombuffer(wire["data"], dtype=np.float32), arr)


def test_decode_returns_a_read_only_view_not_a_further_copy() -> None:
    payload = pack({"t": encode_tensor(np.ones(64, dtype=np.float32))})
    arr = decode_tensors(unpack(payload), where="x")["t"]
    assert not arr.flags.writeable
    assert not arr.flags.owndata


def test_big_endian_and_non_contiguous_inputs_are_normalised() -> None:
    a = np.arange(12, dtype=">f4").reshape(3, 4)[:, ::2]
    back = decode_tensor(unpack(pack(encode_tensor(a))), where="t")
    np.testing.assert_array_equal(back, a)
    assert back.dtype == np.dtype("<f4")


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(sorted(DTYPES)).flatmap(
        lambda name: hnp.arrays(
            np.dtype(name),
            hnp.array_shapes(min_dims=0, max_dims=4, max_side=5),
            elements=hnp.from_dtype(np.dtype(name), allow_nan=False, allow_infinity=False),
        )
    )
)
def test_roundtrip_any_supported_tensor(arr: np.ndarray) -> None:
    back = decode_tensor(unpack(pack(encode_tensor(arr))), where="t")
    assert back.dtype == arr.dtype.newbyteorder("<") and back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)


@settings(max_examples=50, deadline=None)
@given(
    st.dictionaries(
        st.text(min_size=1, max_size=12),
        hnp.arrays(np.float32, hnp.array_shapes(max_dims=3, max_side=6), elements=st.floats(-1e6, 1e6, width=32)),
        max_size=6,
    ),
    st.integers(0, 2**40),
    st.integers(0, 2**31),
)
def test_update_message_roundtrip(delta: dict[str, np.ndarray], seq: int, base: int) -> None:
    u = UpdateMessage(agent_id="dev-1", seq=seq, base_version=base, num_examples=5, delta=delta)
    back = UpdateMessage.from_bytes(u.to_bytes())
    assert (back.seq, back.base_version, back.agent_id) == (seq, base, "dev-1")
    assert back.delta.keys() == delta.keys()
    for k in delta:
        np.testing.assert_array_equal(back.delta[k], delta[k])


def test_model_and_status_roundtrip() -> None:
    m = ModelMessage(
        version=4,
        model=ModelSpec("mlp", 64, 10, 32),
        tensors={"W": np.eye(2, dtype=np.float32)},
        mode="sync",
        selected=("a", "b"),
        max_staleness=0,
        created_at=1.0,
    )
    back = ModelMessage.from_bytes(m.to_bytes())
    assert (back.version, back.model, back.mode, back.selected) == (4, m.model, "sync", ("a", "b"))
    s = StatusMessage("a", "offline", epsilon=None, seq=3, ts=2.0)
    assert StatusMessage.from_bytes(s.to_bytes()) == s
    assert metrics_from_bytes(metrics_to_bytes({"version": 3}))["version"] == 3


LIMITS = DecodeLimits(max_payload_bytes=64 * 1024)
WEIGHTS = {"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32)}
CORPUS = corpus(
    WEIGHTS,
    version=5,
    max_staleness=2,
    replay=pack(update_map(WEIGHTS, agent_id="alice")),
    replay_agent="alice",
    decoder_limit=LIMITS.max_payload_bytes,
)


@pytest.mark.parametrize("case", [c for c in CORPUS if c.stage == "decoder"], ids=lambda c: c.name)
def test_hostile_corpus_is_refused_by_the_decoder_alone_with_its_reason(case: Hostile) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError) as info:
            UpdateMessage.from_bytes(case.payload, LIMITS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.reason is case.reason, info.value
    assert MARKER not in str(info.value)
    # Declared lengths are never trusted: refusing costs about the payload's own size, not more.
    assert peak < 2 * len(case.payload) + 256 * 1024, peak


@pytest.mark.parametrize("case", [c for c in CORPUS if c.stage == "core"], ids=lambda c: c.name)
def test_hostile_corpus_core_cases_are_well_formed_for_the_decoder(case: Hostile) -> None:
    UpdateMessage.from_bytes(case.payload, LIMITS)  # refused later, by the core (tests/test_seams.py)


def test_payload_over_the_limit_is_refused_before_parsing() -> None:
    payload = pack(update_map({"w": np.zeros(10_000, np.float32)}))
    with pytest.raises(DecodeError) as info:
        UpdateMessage.from_bytes(payload, DecodeLimits(max_payload_bytes=1024))
    assert info.value.reason is RejectReason.TOO_LARGE


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_decoder_fuzz_never_raises_anything_but_decode_error(data: bytes) -> None:
    _decode_or_reject(data)


def _decode_or_reject(data: bytes) -> None:
    """Either a DecodeError, or a message that survives its own re-encoding unchanged."""
    try:
        u = UpdateMessage.from_bytes(data)
    except DecodeError:
        return
    again = UpdateMessage.from_bytes(u.to_bytes())
    assert (again.agent_id, again.seq, again.base_version, again.delta.keys()) == (
        u.agent_id,
        u.seq,
        u.base_version,
        u.delta.keys(),
    )
    for k in u.delta:
        assert np.array_equal(again.delta[k], u.delta[k])


@settings(max_examples=200, deadline=None)
@given(st.integers(0, len(GOLDEN_UPDATE) - 1), st.integers(0, 255))
def test_single_byte_corruptions_decode_or_raise_decode_error(pos: int, value: int) -> None:
    data = bytearray(GOLDEN_UPDATE)
    data[pos] = value
    _decode_or_reject(bytes(data))


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.binary(max_size=16),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
_FIELDS = ["schema", "kind", "agent_id", "seq", "base_version", "num_examples", "train_loss", "epsilon", "sent_at"]
_TENSOR_FIELDS = ["delta", "delta.w", "delta.w.dtype", "delta.w.shape", "delta.w.data", "delta.extra"]
_hostile_values = (
    _values
    | st.sampled_from(["float32", "float64", "int32", "uint8", "float16", "bool", "object", ">f4", "update"])
    | st.lists(st.integers(-2, 2**40), max_size=3)
    | st.integers(-2, 2**64 - 1)
)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(_FIELDS + _TENSOR_FIELDS), _hostile_values, min_size=1, max_size=2))
def test_structured_fuzz_reaches_every_check_and_raises_only_decode_errors(corrupt: dict[str, object]) -> None:
    """A valid update with one or two fields replaced by hostile values: past the parser, into validation."""
    obj = update_map({"w": np.array([1.0, -2.0], np.float32)})
    tensor = dict(obj["delta"]["w"])  # type: ignore[index]
    delta: dict[str, object] = {"w": tensor}
    for key, value in corrupt.items():
        if key == "delta":
            obj["delta"] = value
        elif key == "delta.w":
            delta["w"] = value
        elif key == "delta.extra":
            delta["extra"] = value
        elif key.startswith("delta.w."):
            tensor[key.rsplit(".", 1)[1]] = value
        else:
            obj[key] = value
    if "delta" not in corrupt:
        obj["delta"] = delta
    try:
        data = pack(obj)
    except (ValueError, OverflowError, TypeError):
        return  # not representable in msgpack (e.g. an int out of range): nothing to send
    _decode_or_reject(data)


_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.binary(max_size=300),
    st.integers(0, 70_000).map(lambda n: memoryview(bytes(range(256)) * (n // 256) + bytes(n % 256))),
)
_trees = st.recursive(
    _leaves,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=18),
    max_leaves=25,
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=5), _trees, max_size=18))
def test_pack_writes_exactly_what_msgpack_writes(obj: dict[str, object]) -> None:
    """The piecewise packer (large buffers copied once) is byte-for-byte msgpack."""
    assert pack(obj) == msgpack.packb(obj, use_bin_type=True)


def test_pack_copies_a_large_tensor_once_into_the_result() -> None:
    arr = np.arange(1_000_000, dtype=np.float32)
    wire = pack({"t": encode_tensor(arr)})
    assert wire == msgpack.packb({"t": encode_tensor(arr)}, use_bin_type=True)
    tracemalloc.start()
    pack({"t": encode_tensor(arr)})
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1.2 * arr.nbytes  # the result itself, and no intermediate buffer of the same size


def _plain(obj: object) -> object:
    """Our reader's output with bin views turned into bytes, to compare with msgpack's."""
    if isinstance(obj, memoryview):
        return obj.tobytes()
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=5), _trees, max_size=18))
def test_reader_agrees_with_msgpack_on_every_valid_message(obj: dict[str, object]) -> None:
    """Differential test: the zero-copy reader returns what msgpack.unpackb returns."""
    data = msgpack.packb(obj, use_bin_type=True)
    assert _plain(unpack(data)) == msgpack.unpackb(data, raw=False)


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=200))
def test_whatever_the_reader_accepts_msgpack_reads_the_same(data: bytes) -> None:
    """On arbitrary bytes the reader is never more permissive than msgpack, and agrees on the value."""
    try:
        ours = unpack(b"\x81\xa1k" + data)
    except DecodeError as exc:
        reason = exc.reason
        assert reason is RejectReason.MALFORMED
        return
    assert _plain(ours) == msgpack.unpackb(b"\x81\xa1k" + data, raw=False, strict_map_key=True)


def test_decode_is_zero_copy_the_tensor_is_a_view_of_the_payload() -> None:
    arr = np.arange(1_000_000, dtype=np.float32)
    payload = UpdateMessage("a1", 1, 0, 10, {"w": arr}).to_bytes()
    tracemalloc.start()
    back = UpdateMessage.from_bytes(payload)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert np.shares_memory(back.delta["w"], np.frombuffer(payload, dtype=np.uint8))
    assert peak < 64 * 1024  # no copy of the 4 MB tensor, and no temporary of its size
    np.testing.assert_array_equal(back.delta["w"], arr)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_finiteness_check_catches_every_non_finite_value(dtype: str, bad: float) -> None:
    arr = np.zeros(1001, dtype=dtype)
    arr[537] = bad
    with pytest.raises(DecodeError) as err:
        decode_tensor(encode_tensor(arr), where="t")
    assert err.value.reason is RejectReason.NON_FINITE


def test_finiteness_check_accepts_finite_values_whose_squares_overflow() -> None:
    """The fast path (x . x finite) overflows for huge finite floats; the exact check then decides."""
    arr = np.full(100, 3e38, dtype=np.float32)
    np.testing.assert_array_equal(decode_tensor(encode_tensor(arr), where="t"), arr)


@settings(max_examples=300, deadline=None)
@given(
    st.text(max_size=40),
    st.sampled_from(["float16", "float32", "float64", "int8"]),
    st.sampled_from([(4096,), (127, 64), (128, 40), (255, 33), (256, 17), (65535,), (65536,), (1, 1, 8192), (9, 512)]),
)
def test_large_tensors_land_aligned_and_every_msgpack_reader_reads_the_same(
    prefix: str, dtype: str, shape: tuple[int, ...]
) -> None:
    """Whatever precedes it, a large tensor's data starts on an 8-byte boundary, and the
    widened encodings that put it there decode to the same values in msgpack itself."""
    arr = (np.arange(int(np.prod(shape))) % 100).astype(dtype).reshape(shape)
    message = {"p": prefix, "t": encode_tensor(arr), "u": encode_tensor(arr[..., ::-1].copy())}
    data = pack(message)
    plain = msgpack.unpackb(data, raw=False)
    assert plain["p"] == prefix and plain["t"]["shape"] == list(shape) and plain["t"]["dtype"] == dtype
    assert plain["t"]["data"] == arr.tobytes()
    decoded = decode_tensors({k: v for k, v in unpack(data).items() if k != "p"}, where="m")
    for name, expected in (("t", arr), ("u", arr[..., ::-1])):
        assert decoded[name].flags.aligned
        offset = np.frombuffer(data, np.uint8).__array_interface__["data"][0]
        assert (decoded[name].__array_interface__["data"][0] - offset) % 8 == 0
        np.testing.assert_array_equal(decoded[name], expected)


def test_small_messages_are_exactly_what_msgpack_writes() -> None:
    """Only large tensors are padded: control messages and small tensors are plain msgpack."""
    arr = np.ones(100, dtype=np.float32)
    message = {"kind": "update", "delta": {"w": encode_tensor(arr)}, "seq": 3}
    assert pack(message) == msgpack.packb(message, use_bin_type=True)
