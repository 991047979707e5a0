"""Issue 10: one device must not break or steer the federation. Each numbered case of the issue
is a test here (tiers 1-2; the cases that need a broker are in ``test_security.py`` and
``test_hostile_broker.py``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from aggregator.core import Accepted, AggregatorCore, FedBuffRule, Rejected
from aggregator.robust import build_aggregate
from aggregator.rules.noise import NoiseCheck, dp_norm_window
from aggregator.staleness import constant
from edge_agent.trainer import LocalTrainer
from fedmq import SCHEMA_VERSION
from fedmq.codec import encode_tensor, pack
from fedmq.compression import compress
from fedmq.config import AgentConfig, PrivacyConfig
from fedmq.errors import ConfigError, DecodeError, RejectReason
from fedmq.messages import UpdateMessage
from fedmq.topics import validate_agent_id
from models import create_model
from models.datasets import digits
from tests.test_seams import Recorder, feed, make_service, update_bytes

ROBUST = {
    "fedbuff": {},
    "fedasync": {"rule": "fedasync"},
    "krum": {"robust": "krum", "buffer_size": 5, "krum_f": 1},
    "median": {"robust": "median"},
    "trimmed_mean": {"robust": "trimmed_mean"},
    "norm_bound": {"robust": "norm_bound"},
}


def wire_update(weights: dict[str, np.ndarray], agent: str, seq: int, delta: dict[str, Any], **over: Any) -> bytes:
    obj: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "kind": "update",
        "agent_id": agent,
        "seq": seq,
        "base_version": 0,
        "num_examples": 8,
        "train_loss": 0.0,
        "epsilon": None,
        "sent_at": 0.0,
        "delta": delta,
    }
    obj.update(over)
    return pack(obj)


def int8_tensor(shape: tuple[int, ...], scale: float, fill: int = 127) -> dict[str, Any]:
    return {"enc": "int8", "shape": list(shape), "scale": scale, "data": np.full(shape, fill, np.int8).tobytes()}


def all_finite(svc: Any) -> bool:
    return all(np.isfinite(v).all() for v in svc.core.weights.values())


# --- 1. values finite on the wire but not once decoded ----------------------------------------
@pytest.mark.parametrize("name", sorted(ROBUST))
async def test_an_int8_scale_beyond_float32_is_rejected_and_the_service_goes_on(name: str, tmp_path: Path) -> None:
    svc = make_service(tmp_path, **ROBUST[name])
    rec = Recorder()
    w = svc.core.weights  # type: ignore[union-attr]
    poison = {k: int8_tensor(v.shape, 1e300) for k, v in w.items()}  # finite as a float64, inf as float32
    await feed(svc, rec, "mallory", wire_update(w, "mallory", 1, poison))
    for i in range(12):  # honest traffic goes on, and steps the model
        agent = f"h{i}"
        await feed(svc, rec, agent, update_bytes(svc, agent, 1, 0.01 * (i % 3), base=svc.core.version))  # type: ignore[union-attr]
    assert svc.core.stats.rejected["non_finite"] == 1  # type: ignore[union-attr]
    assert svc.core.version >= 1 and all_finite(svc)  # type: ignore[union-attr]
    again = make_service(tmp_path, **ROBUST[name])  # what was checkpointed and logged restores
    assert again.core.version == svc.core.version and all_finite(again)  # type: ignore[union-attr]


async def test_a_state_that_is_not_finite_is_never_checkpointed(tmp_path: Path) -> None:
    """The last line of defence: were a NaN ever to get past the gate (our bug, not a peer's), the
    checkpoint refuses to write it, loudly, and the last good checkpoint stays as it was."""
    svc = make_service(tmp_path)
    rec = Recorder()
    for i in range(4):
        await feed(svc, rec, f"h{i}", update_bytes(svc, f"h{i}", 1, 0.01, base=svc.core.version))  # type: ignore[union-attr]
    await svc.checkpoint()
    before = {p.name: p.read_bytes() for p in tmp_path.glob("checkpoint.*")}
    assert before
    core = svc.core
    assert core is not None
    core._weights = {k: np.full(v.shape, np.nan, v.dtype) for k, v in core.weights.items()}  # the bug
    with pytest.raises(RuntimeError, match="refusing to checkpoint a state that is not finite"):
        await svc.checkpoint()
    assert {p.name: p.read_bytes() for p in tmp_path.glob("checkpoint.*")} == before


EXTREMES = [1e-45, 1e-38, 1.0, 3.0e38, 3.5e38, 1e300]


@pytest.mark.parametrize("method", ["none", "fp16", "int8", "topk"])
async def test_every_compression_method_with_extreme_values_never_poisons_or_stops_the_model(method: str) -> None:
    """A sweep: each extreme value or scale is either refused with a named reason or taken with a
    finite model afterwards; no rule error escapes, for the plain mean and for Multi-Krum."""
    for robust in ({}, {"robust": "krum", "buffer_size": 5, "krum_f": 1}):
        svc = make_service(**robust)
        rec = Recorder()
        w = svc.core.weights  # type: ignore[union-attr]
        seq = 0
        for sign in (1.0, -1.0):  # same-signed extremes meet in one buffer and in consecutive steps
            for x in EXTREMES:
                seq += 1
                agent = f"m{seq}"
                if method == "int8":
                    delta = {k: int8_tensor(v.shape, x, fill=int(sign * 127)) for k, v in w.items()}
                else:
                    dense = {k: np.full(v.shape, sign * x, np.float64) for k, v in w.items()}
                    if method == "none":
                        delta = {
                            k: encode_tensor(np.clip(v, -3.4e38, 3.4e38).astype(np.float32)) for k, v in dense.items()
                        }
                    elif method == "fp16":
                        delta = {
                            k: encode_tensor(np.clip(v, -65504, 65504).astype(np.float16)) for k, v in dense.items()
                        }
                    else:
                        sparse = {k: compress("topk", np.clip(v, -3.4e38, 3.4e38).astype(np.float32), topk_fraction=1.0)
                                  for k, v in dense.items()}  # fmt: skip
                        delta = {k: s.to_wire() for k, s in sparse.items()}  # type: ignore[union-attr]
                await feed(svc, rec, agent, wire_update(w, agent, 1, delta, base_version=svc.core.version))  # type: ignore[union-attr]
                assert all_finite(svc), (method, x, sign)
        reasons = {r.reason for r in rec.receipts() if r.status == "rejected"}
        assert reasons <= {"non_finite", "out_of_range"}, reasons


def test_a_rule_error_about_one_update_rejects_it_and_leaves_the_buffer_as_it_was() -> None:
    """Robust rules refuse non-finite input with a ValueError; the core turns that into a named
    rejection of the update that triggered it, and the buffer keeps the others."""

    class Refusing:
        name = "refusing"
        counters: Any = {}
        trusts_claims = True

        def __call__(self, deltas: Any, weights: Any) -> Any:
            raise ValueError("this buffer is not acceptable")

    w0 = {"W": np.zeros(3, np.float32)}
    core = AggregatorCore(w0, FedBuffRule(2, constant, aggregate=Refusing()))  # type: ignore[arg-type]
    ok = core.receive(UpdateMessage("a", 1, 0, 5, {"W": np.ones(3, np.float32)}), topic_agent_id="a")
    bad = core.receive(UpdateMessage("b", 1, 0, 5, {"W": np.ones(3, np.float32)}), topic_agent_id="b")
    assert isinstance(ok, Accepted)
    assert isinstance(bad, Rejected) and bad.reason.value == "rule_refused" and "not acceptable" in bad.detail
    assert len(core.rule.buffer) == 1 and core.version == 0  # type: ignore[attr-defined]


# --- 2. a norm test is not a privacy check --------------------------------------------------------
def trained_deltas(count: int) -> list[dict[str, np.ndarray]]:
    train, _ = digits()
    rng = np.random.default_rng(0)
    model = create_model("softmax", num_features=64, num_classes=10)
    w0 = model.get_weights()
    out = []
    for i in range(count):
        model.set_weights(w0)
        part = train.subset(rng.choice(len(train), 40, replace=False))
        model.fit(part.x, part.y, epochs=5, batch_size=16, lr=0.3, rng=rng)
        out.append({k: v - w0[k] for k, v in model.get_weights().items()})
        del i
    return out


def test_an_unnoised_update_sized_to_sit_in_the_norm_window_is_refused() -> None:
    z, clip = 0.5, 1.0
    w0 = create_model("softmax", num_features=64, num_classes=10).get_weights()
    dim = sum(v.size for v in w0.values())
    window = dp_norm_window(dim, z * clip, clip)
    target = math.sqrt(dim) * z * clip  # the middle of the window: what an honest update measures
    assert window[0] < target < window[1]
    core = AggregatorCore(
        w0, FedBuffRule(1000, constant), max_staleness=10**6, rate_limit=0, noise_check=NoiseCheck(dim, z * clip, clip)
    )
    deltas = trained_deltas(25)
    for seq, d in enumerate(deltas * 5, start=1):  # 125 attempts, as in the audit
        norm = math.sqrt(sum(float(np.dot(v.ravel(), v.ravel())) for v in d.values()))
        flipped = {k: (-v * (target / norm)).astype(np.float32) for k, v in d.items()}
        r = core.receive(UpdateMessage("mallory", seq, 0, 40, flipped), topic_agent_id="mallory")
        assert isinstance(r, Rejected) and r.reason is RejectReason.NOT_PRIVATE, r
    # ... while honest, really noised updates all pass (no false rejection in 2,000 draws).
    rng = np.random.default_rng(1)
    for i in range(2000):
        d = deltas[i % len(deltas)]
        norm = math.sqrt(sum(float(np.dot(v.ravel(), v.ravel())) for v in d.values()))
        clipped = {k: v * min(1.0, clip / norm) for k, v in d.items()}
        noised = {k: (v + rng.normal(0, z * clip, v.shape)).astype(np.float32) for k, v in clipped.items()}
        r = core.receive(UpdateMessage(f"h{i}", 1, 0, 40, noised), topic_agent_id=f"h{i}")
        assert isinstance(r, Accepted), r


# --- 3. claimed weights ---------------------------------------------------------------------------
def test_a_claimed_example_count_is_capped() -> None:
    w0 = {"W": np.zeros(4, np.float32)}
    core = AggregatorCore(w0, FedBuffRule(2, constant), max_num_examples=1000)  # type: ignore[call-arg]
    core.receive(UpdateMessage("honest", 1, 0, 1000, {"W": np.ones(4, np.float32)}), topic_agent_id="honest")
    core.receive(UpdateMessage("liar", 1, 0, 2**62, {"W": -np.ones(4, np.float32)}), topic_agent_id="liar")
    assert core.version == 1
    np.testing.assert_allclose(core.weights["W"], 0.0, atol=1e-6)  # weight 1000 each: the claim got no more


def test_a_map_with_a_duplicated_key_is_refused() -> None:
    good = update_map_bytes(num_examples=5)
    # Same map, "num_examples" written twice: msgpack keeps the last value.
    body = msgpack.unpackb(good, raw=False)
    items = [*body.items(), ("num_examples", 2**62)]
    raw = bytes([0x80 | len(items)]) + b"".join(
        msgpack.packb(k) + msgpack.packb(v, use_bin_type=True) for k, v in items
    )
    with pytest.raises(DecodeError) as err:
        UpdateMessage.from_bytes(raw)
    assert err.value.reason is RejectReason.MALFORMED and "num_examples" in err.value.detail


def update_map_bytes(num_examples: int) -> bytes:
    return UpdateMessage("a", 1, 0, num_examples, {"W": np.zeros(2, np.float32)}).to_bytes()


@pytest.mark.parametrize("robust", ["krum", "median", "trimmed_mean", "norm_bound"])
def test_robust_rules_do_not_weight_by_the_claimed_count(robust: str) -> None:
    """The same deltas with other claimed counts give the same robust aggregate."""
    rng = np.random.default_rng(0)
    deltas = [{"W": rng.normal(0, 1, 6).astype(np.float32)} for _ in range(7)]
    results = []
    for counts in ([10] * 7, [10, 10, 10, 10, 10, 10, 2**40]):
        agg = build_aggregate(robust, krum_f=1, trim_fraction=0.2)
        core = AggregatorCore({"W": np.zeros(6, np.float32)}, FedBuffRule(7, constant, aggregate=agg))
        for i, (d, n) in enumerate(zip(deltas, counts, strict=True)):
            core.receive(UpdateMessage(f"a{i}", 1, 0, n, d), topic_agent_id=f"a{i}")
        assert core.version == 1
        results.append(core.weights["W"].copy())
    np.testing.assert_array_equal(results[0], results[1])


# --- 4. one device's rate -------------------------------------------------------------------------
def test_a_flood_from_one_device_is_rate_limited() -> None:
    w0 = {"W": np.zeros(4, np.float32)}
    core = AggregatorCore(w0, FedBuffRule(1, constant), max_staleness=10**6)
    accepted = 0
    for seq in range(1, 10_001):  # 10,000 updates, one per millisecond
        r = core.receive(
            UpdateMessage("flood", seq, core.version, 5, {"W": np.zeros(4, np.float32)}),
            topic_agent_id="flood",
            now=1000.0 + seq / 1000,  # type: ignore[call-arg]
        )
        accepted += isinstance(r, Accepted)
    assert accepted <= 100, accepted  # the default bucket: a burst, then a few per second
    assert core.stats.retried["rate_limited"] >= 9_000 and not core.stats.rejected


def test_one_update_per_agent_in_each_buffer_and_a_flooder_moves_the_model_as_much_as_one_honest_device() -> None:
    """K-1 honest devices send one update each per round; the flooder sends 50 per round, first.
    Every delta pushes along its own coordinate, so the model says how far each device moved it.
    With the rate limit off, only the one-per-buffer rule holds the flooder."""
    k, rounds = 5, 40
    honest = [f"h{i}" for i in range(k - 1)]
    names = [*honest, "flood"]
    for rate in (0.0, 1.0):  # the buffer rule alone, then with the default token bucket
        core = AggregatorCore({"W": np.zeros(len(names), np.float32)}, FedBuffRule(k, constant), rate_limit=rate)

        def delta(agent: str) -> dict[str, np.ndarray]:
            d = np.zeros(len(names), np.float32)
            d[names.index(agent)] = 1.0
            return {"W": d}

        seqs = dict.fromkeys(names, 0)
        now = 1000.0
        for agent in names:  # as agents do on connect (retained: the aggregator gets them at once)
            core.agent_status(agent, True, now=now)
        buffers: list[list[str]] = []
        for _ in range(rounds):  # one second per round
            for _ in range(50):
                seqs["flood"] += 1
                now += 0.01
                u = UpdateMessage("flood", seqs["flood"], core.version, 5, delta("flood"))
                core.receive(u, topic_agent_id="flood", now=now)
            for agent in honest:
                seqs[agent] += 1
                buffers.append([e.agent_id for e in core.rule.buffer])  # type: ignore[attr-defined]
                u = UpdateMessage(agent, seqs[agent], core.version, 5, delta(agent))
                core.receive(u, topic_agent_id=agent, now=now)
            now += 0.5
        moved = {a: float(core.weights["W"][names.index(a)]) for a in names}
        assert core.version == rounds, rate
        np.testing.assert_allclose(moved["flood"], moved["h0"], rtol=1e-5)  # exactly one honest device's share
        assert all(len(b) == len(set(b)) for b in buffers)
        refused = core.stats.retried
        # Per round one flood update goes into the buffer, one waits for the next (it is the next
        # round's), and the rest are told to retry; the very first round has no waiting one yet.
        assert refused["agent_buffered"] + refused["rate_limited"] == rounds * 49 - 1


def test_buffer_patience_counts_from_when_the_buffer_got_its_first_update() -> None:
    """The buffer a step opens with the updates it held ages from that step.

    Regression: with the buffer never empty between steps (a held update goes straight into the
    next one), the open time stayed at the first buffer's, so after ``buffer_patience`` seconds of
    training every buffer let each agent in twice, and a flooder moved the model further than an
    honest device (the test above).
    """
    patience = 5.0
    core = AggregatorCore({"W": np.zeros(3, np.float32)}, FedBuffRule(3, constant), rate_limit=0.0,
                          buffer_patience=patience)  # fmt: skip
    seqs = dict.fromkeys("abc", 0)

    def send(agent: str, now: float) -> Accepted | Rejected:
        seqs[agent] += 1
        d = np.zeros(3, np.float32)
        d["abc".index(agent)] = 1.0
        return core.receive(UpdateMessage(agent, seqs[agent], core.version, 5, {"W": d}), topic_agent_id=agent, now=now)

    for agent in "abc":
        core.agent_status(agent, True, now=0.0)
    assert isinstance(send("a", 0.0), Accepted)  # opens the first buffer
    assert isinstance(send("a", 0.1), Accepted) and core.rule.held("a") == 1  # held for the next one
    t = 100.0  # long after the first buffer opened
    assert isinstance(send("b", t), Accepted)
    assert send("c", t).new_version == 1  # type: ignore[union-attr]
    assert core.rule.held("a") == 1  # the held one opened the second buffer, at t
    early = send("a", t + patience - 0.5)  # within patience: a's share is one, this one waits
    assert isinstance(early, Accepted) and core.rule.held("a") == 1
    third = send("a", t + patience - 0.25)
    assert isinstance(third, Rejected) and third.reason is RejectReason.AGENT_BUFFERED
    assert core.version == 1
    late = send("a", t + patience + 0.5)  # past patience: a second one goes in
    assert isinstance(late, Accepted) and core.rule.held("a") == 2


# --- 5. strict schema, bounded payloads, no pinned payloads ---------------------------------------
async def test_an_unknown_top_level_field_is_refused_and_never_logged(tmp_path: Path) -> None:
    svc = make_service(tmp_path)
    rec = Recorder()
    w = svc.core.weights  # type: ignore[union-attr]
    zeros = {k: encode_tensor(np.zeros_like(v)) for k, v in w.items()}
    await feed(svc, rec, "m", wire_update(w, "m", 1, zeros, junk=b"\x00" * (1 << 20)))
    # Answered either way (issue 15): too large to read its seq (then seq 0), or refused by the schema.
    assert [(r.status, r.reason) for r in rec.receipts()] in ([("rejected", "too_large")], [("rejected", "bad_field")])
    assert svc.core.stats.rejected in ({"bad_field": 1}, {"too_large": 1})  # type: ignore[union-attr]
    assert sum(p.stat().st_size for p in tmp_path.glob("wal.*")) < 4096  # nothing of it was logged


async def test_the_payload_limit_follows_the_model_size() -> None:
    svc = make_service()
    rec = Recorder()
    w = svc.core.weights  # type: ignore[union-attr]
    model_bytes = sum(v.nbytes for v in w.values())
    big = {k: encode_tensor(np.zeros_like(v)) for k, v in w.items()}
    big["padding"] = encode_tensor(np.zeros(64 * model_bytes // 4 + 65536, np.float32))
    await feed(svc, rec, "m", wire_update(w, "m", 1, big))
    assert svc.core.stats.rejected == {"too_large": 1}  # type: ignore[union-attr]


def test_buffered_deltas_do_not_pin_payloads_larger_than_themselves() -> None:
    w0 = {"W": np.zeros(1000, np.float32)}
    core = AggregatorCore(w0, FedBuffRule(10, constant))
    payload = UpdateMessage("a", 1, 0, 5, {"W": np.ones(1000, np.float32)}).to_bytes()
    padded = bytearray(payload) + bytearray(1 << 20)  # the tensor is a view into something 250x larger
    view = memoryview(padded)[: len(payload)]
    update = UpdateMessage.from_bytes(view)
    assert isinstance(core.receive(update, topic_agent_id="a"), Accepted)
    kept = core.rule.buffer[0]  # type: ignore[attr-defined]
    arrays = [kept.delta[k] if hasattr(kept, "delta") else kept[0][k] for k in w0]
    for arr in arrays:
        assert owner_nbytes(arr) <= 2 * arr.nbytes + 4096, owner_nbytes(arr)


def owner_nbytes(arr: np.ndarray) -> int:
    """Bytes of the buffer that finally owns ``arr``'s memory (what keeping ``arr`` keeps alive).

    The test's own oracle, written apart from :func:`fedmq.codec.owner_nbytes`, which the code
    under test uses to decide what to copy: a bug there must not hide here.
    """
    obj: Any = arr
    while True:
        if isinstance(obj, np.ndarray) and obj.base is not None:
            obj = obj.base
        elif isinstance(obj, memoryview):
            obj = obj.obj
        else:
            return obj.nbytes if isinstance(obj, np.ndarray) else len(obj)


# --- 6. a sync round does not wait forever ------------------------------------------------------
def test_a_sync_round_times_out_without_the_device_that_reports_online_but_never_sends() -> None:
    from aggregator.core import SyncFedAvgRule

    w0 = {"W": np.zeros(2, np.float32)}
    core = AggregatorCore(w0, SyncFedAvgRule(), sync_agents=2, round_timeout=60.0)  # type: ignore[call-arg]
    core.agent_status("a", True, now=0.0)  # type: ignore[call-arg]
    core.agent_status("stall", True, now=0.0)  # type: ignore[call-arg]
    assert core.selected == ("a", "stall")
    core.receive(UpdateMessage("a", 1, 0, 5, {"W": np.ones(2, np.float32)}), topic_agent_id="a", now=1.0)  # type: ignore[call-arg]
    for t in range(2, 60, 10):  # "stall" keeps reporting online, and never sends
        core.agent_status("stall", True, now=float(t))  # type: ignore[call-arg]
        core.tick(float(t))  # type: ignore[attr-defined]
    assert core.version == 0
    core.tick(61.0)  # type: ignore[attr-defined]
    assert core.version == 1
    np.testing.assert_allclose(core.weights["W"], 1.0)


# --- 8. what is sent in clear ---------------------------------------------------------------------
def test_train_loss_is_not_sent_unless_enabled_and_the_count_is_bucketed() -> None:
    train, _ = digits()
    data = train.subset(np.arange(37))
    trainer = LocalTrainer(AgentConfig(agent_id="pi"), PrivacyConfig(), data, rng=np.random.default_rng(0))
    from fedmq.messages import ModelMessage, ModelSpec

    model = ModelMessage(
        0, ModelSpec("softmax", 64, 10), create_model("softmax", num_features=64, num_classes=10).get_weights()
    )
    wire = msgpack.unpackb(trainer.train(model).to_bytes(), raw=False)
    assert wire.get("train_loss") is None
    assert wire["num_examples"] == 32  # 37 examples, reported as the power of two below
    loud_cfg = AgentConfig(agent_id="pi", send_train_loss=True)
    loud = LocalTrainer(loud_cfg, PrivacyConfig(), data, rng=np.random.default_rng(0))
    assert msgpack.unpackb(loud.train(model).to_bytes(), raw=False)["train_loss"] > 0


# --- 9. smaller ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["agent-1\n", "agent-1\r\n", "a" * 65, "a/b", "a+b", ""])
def test_agent_ids_are_matched_whole(bad: str) -> None:
    with pytest.raises(ConfigError):
        validate_agent_id(bad)


def test_write_ahead_log_files_are_private(tmp_path: Path) -> None:
    from aggregator.wal import WalHeader, WriteAheadLog

    wal = WriteAheadLog.create(tmp_path, WalHeader("0123456789abcdef", 0, 0))
    wal.write_update("a", b"x", now=0.0, index=1)
    wal.sync()
    wal.close()
    for p in tmp_path.glob("wal.*"):
        assert p.stat().st_mode & 0o777 == 0o600, oct(p.stat().st_mode)


def test_per_agent_state_is_bounded() -> None:
    w0 = {"W": np.zeros(2, np.float32)}
    core = AggregatorCore(w0, FedBuffRule(1, constant), max_staleness=10**6, max_agents=100)  # type: ignore[call-arg]
    for i in range(1000):  # a device inventing ids on the development broker
        u = UpdateMessage(f"sybil-{i}", 1, core.version, 5, {"W": np.zeros(2, np.float32)})
        core.receive(u, topic_agent_id=f"sybil-{i}")
        core.agent_status(f"ghost-{i}", True)
    assert core.known_agents <= 100  # type: ignore[attr-defined]
    assert len(core.online) <= 100
