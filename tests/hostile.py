"""The hostile-input corpus: updates a compromised or buggy device, or a hostile network, could send.

One list serves three tiers: the decoder alone (``stage == "decoder"``), the sans-IO core
behind it (``"core"``: well-formed messages that must still be refused), and a real broker
in front of a running aggregator (every entry, plus ``"broker"``: above the broker's own
packet limit, which the broker must drop before the aggregator sees it).

Payloads carry :data:`MARKER` where a free string can go (an unknown field, an agent id, a
tensor encoding), so a test can assert that no log line ever repeats payload content.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import numpy.typing as npt

from fedmq import SCHEMA_VERSION
from fedmq.codec import encode_tensor, pack
from fedmq.errors import RejectReason

MARKER = "PAYLOAD-MARKER-7f3a"


@dataclass(frozen=True)
class Hostile:
    """One hostile message: what to publish, on whose topic, and how it must be refused."""

    name: str
    payload: bytes
    reason: RejectReason | None  # None: the broker refuses it (above its packet limit)
    stage: str  # "decoder" | "core" | "broker"
    topic_agent: str


def update_map(weights: Mapping[str, npt.NDArray[Any]], **over: object) -> dict[str, object]:
    """A well-formed update map for a model with ``weights``; ``over`` replaces fields."""
    base: dict[str, object] = {
        "schema": SCHEMA_VERSION,
        "kind": "update",
        "agent_id": "mallory",
        "seq": 1,
        "base_version": 0,
        "num_examples": 3,
        "train_loss": 0.0,
        "epsilon": None,
        "sent_at": 0.0,
        "delta": {k: encode_tensor(np.zeros_like(v)) for k, v in weights.items()},
    }
    base.update(over)
    return base


def corpus(
    weights: Mapping[str, npt.NDArray[Any]],
    *,
    version: int,
    max_staleness: int,
    replay: bytes,
    replay_agent: str,
    decoder_limit: int,
    broker_limit: int | None = None,
) -> list[Hostile]:
    """Build the corpus for a model with ``weights`` whose aggregator is at ``version``.

    ``replay`` is a payload the aggregator already accepted from ``replay_agent``; sent again
    it must be refused as a duplicate. Each entry comes from its own topic agent (so each is
    logged exactly once) except the replay, which must come from its original sender.
    """
    name0, ref = next(iter(weights.items()))
    enc = encode_tensor

    def upd(**over: object) -> bytes:
        return pack(update_map(weights, **({"base_version": version} | over)))

    def tensor(dtype: str = "float32", shape: object = None, data: bytes | None = None) -> dict[str, object]:
        t = dict(enc(np.zeros_like(ref)))
        t["dtype"] = dtype
        if shape is not None:
            t["shape"] = shape
        if data is not None:
            t["data"] = data
        return {**update_map(weights)["delta"], name0: t}  # type: ignore[dict-item]

    def topk(index: list[int], *, values: int | None = None, shape: object = None, fill: float = 0.5) -> object:
        n = len(index) if values is None else values
        return {
            "enc": "topk",
            "shape": list(ref.shape) if shape is None else shape,
            "index": np.array(index, "<u4").tobytes(),
            "value": np.full(n, fill, "<f4").tobytes(),
        }

    def int8(*, scale: float = 0.01, cut: int = 0) -> object:
        data = np.zeros(ref.size - cut, np.int8).tobytes()
        return {"enc": "int8", "shape": list(ref.shape), "scale": scale, "data": data}

    nan = np.zeros_like(ref)
    nan.flat[0] = np.nan
    inf = np.zeros_like(ref)
    inf.flat[-1] = np.inf
    wrong_shape = np.zeros((ref.size + 1,), ref.dtype)
    zeros = update_map(weights)["delta"]
    assert isinstance(zeros, dict)
    R, D, C = RejectReason, "decoder", "core"
    stale_base = max(0, version - max_staleness - 1)
    entries: list[tuple[str, bytes, RejectReason | None, str]] = [
        # -- the decoder must refuse these before anything else looks at them
        ("truncated msgpack", upd()[:-7], R.MALFORMED, D),
        ("empty payload", b"", R.MALFORMED, D),
        ("not a map", msgpack.packb([1, 2, MARKER]), R.MALFORMED, D),
        ("int map key", msgpack.packb({1: MARKER}), R.MALFORMED, D),
        ("wrong schema version", upd(schema=SCHEMA_VERSION + 98), R.SCHEMA_VERSION, D),
        ("wrong message kind", upd(kind="model"), R.WRONG_KIND, D),
        ("ext type", msgpack.packb({"schema": 1, "x": msgpack.ExtType(5, MARKER.encode())}), R.MALFORMED, D),
        ("deeply nested maps", b"\x81\xa1k" * 5_000 + b"\xc0", R.MALFORMED, D),
        ("deeply nested arrays", b"\x91" * 20_000 + b"\x00", R.MALFORMED, D),
        ("huge declared array length", b"\xdd\xff\xff\xff\xff" + b"\x00" * 8, R.MALFORMED, D),
        ("huge declared map length", b"\xdf\xff\xff\xff\xff" + b"\x00" * 8, R.MALFORMED, D),
        ("huge declared bin length", b"\x81\xa1x\xc6\x7f\xff\xff\xff" + b"\x00" * 8, R.MALFORMED, D),
        ("huge declared str length", b"\x81\xa1x\xdb\x7f\xff\xff\xff" + b"a" * 8, R.MALFORMED, D),
        ("object dtype", upd(delta=tensor(dtype="object")), R.BAD_DTYPE, D),
        ("complex dtype", upd(delta=tensor(dtype="complex64")), R.BAD_DTYPE, D),
        ("big-endian dtype", upd(delta=tensor(dtype=">f4")), R.BAD_DTYPE, D),
        ("shape larger than data", upd(delta=tensor(shape=[ref.size + 1])), R.SHAPE_MISMATCH, D),
        ("huge declared shape", upd(delta=tensor(shape=[2**31, 2**31])), R.SHAPE_MISMATCH, D),
        ("negative shape", upd(delta=tensor(shape=[-ref.size])), R.SHAPE_MISMATCH, D),
        ("float in shape", upd(delta=tensor(shape=[float(ref.size)])), R.SHAPE_MISMATCH, D),
        ("NaN in a delta", upd(delta={**zeros, name0: enc(nan)}), R.NON_FINITE, D),
        ("Inf in a delta", upd(delta={**zeros, name0: enc(inf)}), R.NON_FINITE, D),
        ("extra tensor field", upd(delta={**zeros, name0: {**enc(ref), "x": MARKER}}), R.BAD_FIELD, D),
        ("negative seq", upd(seq=-1), R.BAD_FIELD, D),
        ("bool seq", upd(seq=True), R.BAD_FIELD, D),
        ("zero examples", upd(num_examples=0), R.BAD_FIELD, D),
        ("NaN train loss", upd(train_loss=float("nan")), R.BAD_FIELD, D),
        ("agent id not a string", upd(agent_id=5), R.BAD_FIELD, D),
        ("agent id with wildcard", upd(agent_id="a/#"), R.BAD_FIELD, D),
        # -- compressed forms (fedmq.compression): decoded to dense tensors only after validation
        ("top-k index out of range", upd(delta={**zeros, name0: topk([ref.size])}), R.SHAPE_MISMATCH, D),
        ("top-k indices not increasing", upd(delta={**zeros, name0: topk([3, 1])}), R.SHAPE_MISMATCH, D),
        ("top-k index/value lengths differ", upd(delta={**zeros, name0: topk([1], values=2)}), R.SHAPE_MISMATCH, D),
        ("top-k decompression bomb", upd(delta={**zeros, name0: topk([1], shape=[2**40])}), R.TOO_LARGE, D),
        ("top-k NaN value", upd(delta={**zeros, name0: topk([1], fill=float("nan"))}), R.NON_FINITE, D),
        ("int8 NaN scale", upd(delta={**zeros, name0: int8(scale=float("nan"))}), R.NON_FINITE, D),
        ("int8 short data", upd(delta={**zeros, name0: int8(cut=1)}), R.SHAPE_MISMATCH, D),
        ("unknown tensor encoding", upd(delta={**zeros, name0: {"enc": "zstd", "data": MARKER}}), R.BAD_FIELD, D),
        ("int8 scale overflows float32", upd(delta={**zeros, name0: int8(scale=1e300)}), R.NON_FINITE, D),
        ("unknown top-level field", upd(note=MARKER), R.BAD_FIELD, D),
        ("a key written twice", _twice(upd(), "num_examples", 2**62), R.MALFORMED, D),
        ("oversized (decoder limit)", upd(note=MARKER * (decoder_limit // len(MARKER) + 1)), R.TOO_LARGE, D),
        # -- well formed, but the core must refuse them
        ("unknown base version", upd(base_version=version + 1000), R.UNKNOWN_BASE_VERSION, C),
        ("far-stale base version", upd(base_version=stale_base), R.TOO_STALE, C),
        ("agent id disagrees with topic", upd(agent_id=replay_agent, seq=10**9), R.AGENT_ID_MISMATCH, C),
        ("unknown tensor names", upd(delta={"evil": enc(np.zeros(4, np.float32))}), R.MODEL_MISMATCH, C),
        ("tensor shape differs from the model", upd(delta={**zeros, name0: enc(wrong_shape)}), R.MODEL_MISMATCH, C),
        (
            "float64 delta for a float32 model",
            upd(delta={k: enc(v.astype(np.float64)) for k, v in weights.items()}),
            R.MODEL_MISMATCH,
            C,
        ),
        ("replayed update", replay, R.DUPLICATE, C),
        ("finite but overflowing", upd(delta={**zeros, name0: enc(np.full_like(ref, 3e38))}), R.OUT_OF_RANGE, C),
    ]
    if broker_limit is not None:
        too_big = upd(note=MARKER * (broker_limit // len(MARKER) + 1))
        entries.append(("oversized (broker limit)", too_big, None, "broker"))
    out = []
    for i, (name, payload, reason, stage) in enumerate(entries):
        agent = replay_agent if name == "replayed update" else f"hostile-{i:02d}"
        if name.startswith("agent id disagrees"):
            agent = f"hostile-{i:02d}"
        elif stage == "core" and name != "replayed update":
            # Well-formed updates name their own sender, so only the property under test fails.
            payload = _with_agent(payload, agent)
        out.append(Hostile(name, payload, reason, stage, agent))
    return out


def _twice(payload: bytes, key: str, value: object) -> bytes:
    """The map of ``payload`` with ``key`` written a second time (msgpack readers keep the last)."""
    obj = msgpack.unpackb(payload, raw=False)
    items = [*obj.items(), (key, value)]
    return bytes([0x80 | len(items)]) + b"".join(
        msgpack.packb(k) + msgpack.packb(v, use_bin_type=True) for k, v in items
    )


def _with_agent(payload: bytes, agent: str) -> bytes:
    obj = msgpack.unpackb(payload, raw=False)
    obj["agent_id"] = agent
    return pack(obj)
