"""Tier 1: the sans-IO aggregation core: validation, versioning, rules, sync rounds, checkpoints."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from aggregator.core import RECEIPTS_KEPT, Accepted, AggregatorCore, FedAsyncRule, FedBuffRule, Rejected, SyncFedAvgRule
from aggregator.rules import fedbuff_step
from aggregator.staleness import constant, polynomial
from fedmq.errors import RejectReason, StateError
from fedmq.messages import UpdateMessage
from fedmq.state import read_state, write_state

W0 = {"W": np.zeros((4, 2), np.float32), "b": np.zeros(2, np.float32)}


def upd(agent: str, seq: int, base: int, value: float = 1.0, n: int = 10, **kw: object) -> UpdateMessage:
    delta = {"W": np.full((4, 2), value, np.float32), "b": np.full(2, value, np.float32)}
    delta.update(kw.pop("delta", {}))  # type: ignore[arg-type]
    return UpdateMessage(agent_id=agent, seq=seq, base_version=base, num_examples=n, delta=delta, **kw)  # type: ignore[arg-type]


def fedbuff_core(k: int = 2, **kw: object) -> AggregatorCore:
    kw.setdefault("rate_limit", 0)  # these tests send many updates per agent at one instant
    return AggregatorCore(W0, FedBuffRule(k, lambda s: polynomial(s, 0.5)), **kw)  # type: ignore[arg-type]


def test_fedbuff_core_advances_every_k_updates_with_oracle_weights() -> None:
    core = fedbuff_core(2)
    r1 = core.receive(upd("a", 1, 0, 1.0, n=10), topic_agent_id="a")
    assert isinstance(r1, Accepted) and r1.new_version is None and core.version == 0
    r2 = core.receive(upd("b", 1, 0, 3.0, n=30), topic_agent_id="b")
    assert isinstance(r2, Accepted) and r2.new_version == 1
    np.testing.assert_allclose(core.weights["W"], np.full((4, 2), (10 * 1 + 30 * 3) / 40))
    # one version stale: weight 10 * 2**-0.5 against 10 * 1
    core.receive(upd("a", 2, 0, 2.0, n=10))
    core.receive(upd("b", 2, 1, 0.0, n=10))
    s = 2**-0.5
    np.testing.assert_allclose(core.weights["b"], np.full(2, 2.5 + (s * 2.0) / (s + 1)), rtol=1e-6)
    assert core.stats.accepted == 4 and core.stats.staleness_sum == 1


def test_weights_are_read_only() -> None:
    core = fedbuff_core(1)
    with pytest.raises(ValueError):
        core.weights["W"][0, 0] = 1.0


@pytest.mark.parametrize(
    ("update", "topic", "reason"),
    [
        (upd("b", 1, 0), "a", RejectReason.AGENT_ID_MISMATCH),
        (upd("a", 1, 5), "a", RejectReason.UNKNOWN_BASE_VERSION),
        (upd("a", 1, 0, delta={"extra": np.zeros(1, np.float32)}), "a", RejectReason.MODEL_MISMATCH),
        (upd("a", 1, 0, delta={"W": np.zeros((2, 4), np.float32)}), "a", RejectReason.MODEL_MISMATCH),
        (upd("a", 1, 0, delta={"W": np.zeros((4, 2), np.float64)}), "a", RejectReason.MODEL_MISMATCH),
    ],
)
def test_invalid_updates_are_rejected_counted_and_change_nothing(
    update: UpdateMessage, topic: str, reason: RejectReason
) -> None:
    core = fedbuff_core(1)
    result = core.receive(update, topic_agent_id=topic)
    assert isinstance(result, Rejected) and result.reason is reason
    assert core.stats.rejected[reason.value] == 1 and core.stats.accepted == 0
    assert core.version == 0 and not core.weights["W"].any()


def test_duplicates_and_replays_are_rejected() -> None:
    core = fedbuff_core(1)
    assert isinstance(core.receive(upd("a", 5, 0)), Accepted)
    r = core.receive(upd("a", 5, 1))  # the same (agent, seq) again: a replay or an outbox re-send
    assert isinstance(r, Rejected) and r.reason is RejectReason.DUPLICATE and r.resent
    assert core.stats.duplicates == 1 and core.stats.rejected == {}  # a re-send, not a fault
    assert core.receipt_for("a", 5) == (1, 1)  # (version after it, its index in the order of application)
    assert core.version == 1


def test_an_older_seq_arriving_late_is_new_but_not_below_the_window() -> None:
    """Exactly once by membership, not by maximum: an outbox re-send may overtake nothing twice."""
    core = fedbuff_core(1, max_staleness=10_000)
    assert isinstance(core.receive(upd("a", 5, 0)), Accepted)
    assert isinstance(core.receive(upd("a", 4, 1)), Accepted)  # delivered after 5, never seen: new
    for seq in range(100, 100 + RECEIPTS_KEPT):  # fill the window with newer ones
        core.receive(upd("a", seq, core.version))
    rec = core.agent("a")
    assert rec is not None and min(rec.receipts) == 100
    r = core.receive(upd("a", 3, core.version))
    assert isinstance(r, Rejected) and r.reason is RejectReason.DUPLICATE and "older" in r.detail and not r.resent
    assert core.stats.rejected["duplicate"] == 1  # no receipt to repeat: refused


def test_too_stale_is_rejected() -> None:
    core = fedbuff_core(1, max_staleness=2)
    for i in range(3):
        core.receive(upd("a", i + 1, i))
    assert core.version == 3
    r = core.receive(upd("b", 1, 0))
    assert isinstance(r, Rejected) and r.reason is RejectReason.TOO_STALE
    assert isinstance(core.receive(upd("b", 2, 1)), Accepted)


def test_fedasync_mixes_against_the_base_version() -> None:
    core = AggregatorCore(W0, FedAsyncRule(0.5, lambda s: polynomial(s, 1.0)), max_staleness=3)
    core.receive(upd("a", 1, 0, 2.0))  # v1 = 0.5 * 0 + 0.5 * (0 + 2) = 1
    np.testing.assert_allclose(core.weights["b"], [1.0, 1.0])
    core.receive(upd("b", 1, 0, 4.0))  # stale 1: a = 0.5 / 2; v2 = 0.75 * 1 + 0.25 * (0 + 4) = 1.75
    np.testing.assert_allclose(core.weights["b"], [1.75, 1.75])
    assert core.version == 2


def sync_core(**kw: object) -> AggregatorCore:
    return AggregatorCore(W0, SyncFedAvgRule(), **kw)  # type: ignore[arg-type]


def test_sync_round_waits_for_every_selected_agent() -> None:
    core = sync_core(sync_agents=3, seed=1)
    for a in ("a", "b", "c"):
        effects = core.agent_status(a, True)
    assert core.selected == ("a", "b", "c")  # enough online: the round opens, is logged and published
    assert [type(e).__name__ for e in effects] == ["LogEvent", "PublishModel"]
    assert core.receive(upd("a", 1, 0, 1.0, n=1)).new_version is None  # type: ignore[union-attr]
    r = core.receive(upd("a", 2, 0, 1.0))
    assert isinstance(r, Rejected) and r.reason is RejectReason.NOT_SELECTED
    assert core.receive(upd("b", 1, 0, 2.0, n=1)).new_version is None  # type: ignore[union-attr]
    assert core.round_open
    r3 = core.receive(upd("c", 1, 0, 6.0, n=2))
    assert isinstance(r3, Accepted) and r3.new_version == 1
    np.testing.assert_allclose(core.weights["b"], [(1 + 2 + 12) / 4] * 2)
    assert core.selected == ("a", "b", "c") and core.round_open  # all still online: the next round is open


def test_sync_round_completes_when_an_awaited_agent_goes_offline() -> None:
    core = sync_core(sync_agents=2, seed=0)
    for a in ("a", "b", "c"):
        core.agent_status(a, True)
    selected = core.selected
    assert selected is not None and len(selected) == 2
    core.receive(upd(selected[0], 1, 0, 1.0))
    core.agent_status(selected[1], False)
    assert core.version == 1
    np.testing.assert_allclose(core.weights["b"], [1.0, 1.0])


def test_sync_stale_update_is_rejected() -> None:
    core = sync_core()
    core.agent_status("a", True)
    core.receive(upd("a", 1, 0))
    assert core.version == 1 and core.selected == ("a",)  # the next round opened at once
    r = core.receive(upd("a", 2, 0))
    assert isinstance(r, Rejected) and r.reason is RejectReason.TOO_STALE


def test_a_sync_round_replays_from_its_logged_events() -> None:
    """The round's selection, an agent leaving and a timeout are logged as events; a replay of
    the log gives the same versions and weights, without soft state (nobody online)."""
    live = sync_core(sync_agents=3, seed=3, round_timeout=10.0)
    log: list[tuple[str, object, float]] = []

    def keep(effects: object, update: UpdateMessage | None = None, now: float = 0.0) -> None:
        for e in effects:  # type: ignore[attr-defined]
            if type(e).__name__ == "LogEvent":
                log.append(("event", e.event, e.now))
            elif type(e).__name__ == "LogUpdate":
                log.append(("update", update, e.now))

    for a in "abcd":
        keep(live.agent_status(a, True, now=0.0))
    first = live.selected
    assert first is not None
    keep(
        live.receive(upd(first[0], 1, 0, 1.0), topic_agent_id=first[0], now=1.0).effects, upd(first[0], 1, 0, 1.0), 1.0
    )
    keep(live.agent_status(first[1], False, now=2.0))  # leaves: no longer awaited
    keep(live.tick(11.0))  # the round times out with one update: version 1
    second = live.selected
    assert live.version == 1 and second is not None
    for i, a in enumerate(second):
        u = upd(a, 10 + i, 1, float(i))
        keep(live.receive(u, topic_agent_id=a, now=12.0).effects, u, 12.0)
    assert live.version == 2
    replayed = sync_core(sync_agents=3, seed=99, round_timeout=10.0)
    for kind, item, now in log:
        if kind == "event":
            replayed.replay("event", event=item, now=now)  # type: ignore[arg-type]
        else:
            assert isinstance(item, UpdateMessage)
            assert isinstance(replayed.replay("update", update=item, agent_id=item.agent_id, now=now), Accepted)
    assert replayed.version == live.version
    for k in W0:
        assert np.array_equal(replayed.weights[k], live.weights[k])


def test_checkpoint_roundtrip_continues_bit_identically(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)

    def rnd(agent: str, seq: int, base: int) -> UpdateMessage:
        return UpdateMessage(
            agent_id=agent,
            seq=seq,
            base_version=base,
            num_examples=int(rng.integers(1, 50)),
            delta={"W": rng.standard_normal((4, 2)).astype(np.float32), "b": rng.standard_normal(2).astype(np.float32)},
        )

    updates = [rnd(f"a{i % 3}", i, max(0, i // 3 - 1)) for i in range(1, 12)]
    ref = AggregatorCore(W0, FedBuffRule(3, constant, server_lr=0.7, momentum=0.9))
    for u in updates:
        ref.receive(u)
    a = AggregatorCore(W0, FedBuffRule(3, constant, server_lr=0.7, momentum=0.9))
    for u in updates[:7]:  # mid-buffer, with momentum state
        a.receive(u)
    write_state(tmp_path / "ckpt", "aggregator-checkpoint", a.state_dict())
    b = AggregatorCore(W0, FedBuffRule(3, constant, server_lr=0.7, momentum=0.9))
    b.load_state_dict(read_state(tmp_path / "ckpt", "aggregator-checkpoint"))  # type: ignore[arg-type]
    assert b.version == a.version and b.last_seq == a.last_seq and b.state_dict()["agents"] == a.state_dict()["agents"]
    for u in updates[7:]:
        b.receive(u)
    assert b.version == ref.version
    for k in W0:
        assert np.array_equal(b.weights[k], ref.weights[k])
    r = b.receive(updates[3])
    assert isinstance(r, Rejected) and r.reason is RejectReason.DUPLICATE


def test_checkpoint_of_another_rule_is_refused() -> None:
    a = fedbuff_core(2)
    b = AggregatorCore(W0, FedAsyncRule(0.5, constant))
    with pytest.raises(ValueError, match="rule"):
        b.load_state_dict(a.state_dict())


def test_corrupt_state_file_names_the_path(tmp_path: Path) -> None:
    p = tmp_path / "ckpt"
    p.write_bytes(b"\x93garbage")
    with pytest.raises(StateError, match=str(p)):
        read_state(p, "aggregator-checkpoint")
    assert read_state(tmp_path / "missing", "aggregator-checkpoint") is None


def test_fedbuff_core_equals_pure_rule() -> None:
    rng = np.random.default_rng(7)
    deltas = [
        {"W": rng.standard_normal((4, 2)).astype(np.float32), "b": rng.standard_normal(2).astype(np.float32)}
        for _ in range(4)
    ]
    core = AggregatorCore(W0, FedBuffRule(4, constant, server_lr=0.5))
    for i, d in enumerate(deltas):
        core.receive(UpdateMessage(agent_id=f"x{i}", seq=1, base_version=0, num_examples=i + 1, delta=d))
    expected, _ = fedbuff_step(W0, deltas, [1.0, 2.0, 3.0, 4.0], server_lr=0.5)
    for k in W0:
        assert np.array_equal(core.weights[k], expected[k])


def test_the_agents_outbox_floor_lets_the_core_forget_settled_receipts() -> None:
    core = fedbuff_core(1, max_staleness=10_000)
    for seq in (1, 2, 3):
        assert isinstance(core.receive(upd("a", seq, core.version)), Accepted)
    later = replace(upd("a", 5, core.version), oldest_pending=3)  # 1 and 2 have their receipts
    assert isinstance(core.receive(later), Accepted)
    rec = core.agent("a")
    assert rec is not None and sorted(rec.receipts) == [3, 5] and rec.floor == 3
    r = core.receive(upd("a", 2, core.version))  # a replay from below the floor
    assert isinstance(r, Rejected) and r.reason is RejectReason.DUPLICATE and "floor" in r.detail
    assert isinstance(core.receive(upd("a", 4, core.version)), Accepted)  # above it and unseen: new
    restored = fedbuff_core(1, max_staleness=10_000)
    restored.load_state_dict(core.state_dict())
    assert restored.agent("a") == core.agent("a")
