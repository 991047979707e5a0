"""Tier 1: hierarchical aggregation over the update protocol (aggregator/uplink.py, the root's sums).

A site sums its devices' updates and sends each sum to the root as one weighted update. The
root's FedBuff step must be the one it would take over the devices' own updates, a sum must come
only from a listed site, and the site's uplink must apply every device update exactly once through
lost and repeated messages and site crashes (the root here is the real AggregatorCore).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest

from aggregator.core import Accepted, AggregatorCore, FedBuffRule, Rejected, SendReceipt, Stats
from aggregator.privacy import FederationLedger
from aggregator.rules import fedbuff_step
from aggregator.sharding import AppliedWindow, Partial, ShardCore
from aggregator.uplink import DeviceReceipt, KeepSum, SendSum, Settle, UplinkCore, UplinkEffect
from fedmq.config import AggregatorConfig
from fedmq.errors import ConfigError, DecodeError, RejectReason
from fedmq.messages import ReceiptMessage, UpdateMessage
from fedmq.secagg.server import CohortManager
from fedmq.staleness import make_staleness_fn

SHAPES = {"W": (5, 3), "b": (3,)}
S = make_staleness_fn("polynomial", 0.5)
SITE = "site-a"


def model(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


def update(agent: str, seq: int, base: int, n: int, seed: int, **kw: object) -> UpdateMessage:
    rng = np.random.default_rng(seed)
    delta = {k: (0.1 * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}
    return UpdateMessage(agent, seq, base, n, delta, **kw)  # type: ignore[arg-type]


def root(k: int, version: int = 0, **kw: object) -> AggregatorCore:
    return AggregatorCore(model(), FedBuffRule(k, S), version=version, sites=[SITE], **kw)  # type: ignore[arg-type]


def shard(version: int, partial_size: int = 2, min_agents: int = 1, first_pid: int = 1) -> ShardCore:
    return ShardCore(
        SITE,
        model(),
        version=version,
        staleness=S,
        max_staleness=50,
        max_update_norm=100.0,
        max_num_examples=1000,
        partial_size=partial_size,
        partial_wait=5.0,
        min_agents=min_agents,
        first_pid=first_pid,
    )


def sent(effects: list[UplinkEffect]) -> list[UpdateMessage]:
    """The sums the effects send, as the root decodes them."""
    return [UpdateMessage.from_bytes(e.payload) for e in effects if isinstance(e, SendSum)]


def receipts(effects: list[UplinkEffect]) -> list[ReceiptMessage]:
    return [e.receipt for e in effects if isinstance(e, DeviceReceipt)]


# --- the root --------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", [0, 3])
def test_a_sites_sum_makes_the_step_fedbuff_takes_over_the_devices_own_updates(version: int) -> None:
    """K = 4: three device updates through the site, one straight to the root; the oracle is
    fedbuff_step over the four updates with weights n_i s(staleness_i)."""
    devices = [update(f"d{i}", 1, max(0, version - i), 8 << i, seed=i) for i in range(4)]
    up = UplinkCore(SITE, shard(version, partial_size=3))
    out: list[UplinkEffect] = []
    for u in devices[:3]:
        out += up.update(u, topic_agent=u.agent_id, now=1.0)
    (msg,) = sent(out)
    assert (msg.agent_id, msg.seq, msg.base_version, msg.contributions) == (SITE, 1, version, 3)

    core = root(4, version=version)
    first = core.receive(msg, topic_agent_id=SITE, now=1.0)
    assert isinstance(first, Accepted)
    assert first.new_version is None
    assert core.rule.open_slots() == (3, 4)
    last = core.receive(devices[3], topic_agent_id="d3", now=1.0)
    assert isinstance(last, Accepted)
    assert last.new_version == version + 1

    weights = [float(u.num_examples) * S(version - u.base_version) for u in devices]
    expected, _ = fedbuff_step(model(), [u.delta for u in devices], weights)
    for k in SHAPES:
        np.testing.assert_allclose(core.weights[k], expected[k], rtol=1e-5, atol=1e-6)
    assert (core.stats.site_sums, core.stats.site_updates) == (1, 3)


def test_versions_that_pass_in_transit_discount_the_sum_as_the_module_says() -> None:
    """The site summed at version 2; the root is at 5: the sum weighs sum_i c_i * s(3)."""
    devices = [update(f"d{i}", 1, i, 16, seed=i) for i in range(2)]
    up = UplinkCore(SITE, shard(2))
    out = [e for u in devices for e in up.update(u, topic_agent=u.agent_id, now=0.0)]
    (msg,) = sent(out)
    direct = update("d9", 1, 5, 32, seed=9)
    core = root(3, version=5)
    assert isinstance(core.receive(msg, topic_agent_id=SITE), Accepted)
    assert isinstance(core.receive(direct, topic_agent_id="d9"), Accepted)
    c = [16 * S(2 - u.base_version) * S(3) for u in devices]
    expected, _ = fedbuff_step(model(), [devices[0].delta, devices[1].delta, direct.delta], [*c, 32 * S(0)])
    for k in SHAPES:
        np.testing.assert_allclose(core.weights[k], expected[k], rtol=1e-5, atol=1e-6)


def test_a_sum_from_a_sender_the_root_does_not_list_is_refused_not_a_site() -> None:
    u = update("d0", 1, 0, 8, seed=0, weight=64.0, contributions=8)
    core = root(2)
    result = core.receive(u, topic_agent_id="d0")
    assert isinstance(result, Rejected)
    assert result.reason is RejectReason.NOT_A_SITE
    assert core.stats.rejected["not_a_site"] == 1
    assert core.rule.open_slots() == (0, 2)
    (answer,) = [e.receipt for e in result.effects if isinstance(e, SendReceipt)]
    assert (answer.agent_id, answer.status, answer.reason) == ("d0", "rejected", "not_a_site")


def test_a_site_is_neither_rate_limited_nor_held_to_one_update_per_buffer() -> None:
    """A device gets one update per buffer and a token bucket; a site speaks for many devices."""
    core = root(10, rate_limit=0.001, rate_burst=1.0)
    for seq in (1, 2, 3):
        u = update(SITE, seq, 0, 2, seed=seq, weight=2.0, contributions=2)
        result = core.receive(u, topic_agent_id=SITE, now=1.0)
        assert isinstance(result, Accepted)
        assert not any(isinstance(e, SendReceipt) and e.receipt.deferred for e in result.effects)
    assert core.rule.open_slots() == (6, 10)
    device = [core.receive(update("d0", s, 0, 2, seed=10 + s), topic_agent_id="d0", now=1.0) for s in (1, 2)]
    assert isinstance(device[0], Accepted)
    assert isinstance(device[1], Rejected)
    assert device[1].reason is RejectReason.RATE_LIMITED


def test_a_checkpoint_keeps_what_a_sum_counts_for() -> None:
    core = root(4)
    core.receive(update(SITE, 1, 0, 3, seed=1, weight=3.0, contributions=3), topic_agent_id=SITE)
    again = root(4)
    again.load_state_dict(core.state_dict())
    assert again.rule.open_slots() == (3, 4)
    for c in (core, again):
        assert isinstance(c.receive(update("d1", 1, 0, 4, seed=2), topic_agent_id="d1"), Accepted)
        assert c.version == 1
    for k in SHAPES:
        np.testing.assert_array_equal(core.weights[k], again.weights[k])


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({"weight": 4.0}, "contributions"),
        ({"contributions": 3}, "weight"),
        ({"weight": 0.0, "contributions": 3}, "weight must be > 0"),
        ({"weight": float("nan"), "contributions": 3}, "weight"),
        ({"weight": 4.0, "contributions": 0}, "contributions"),
    ],
)
def test_the_decoder_takes_weight_and_contributions_together_and_valid(fields: dict[str, object], why: str) -> None:
    body = update(SITE, 1, 0, 2, seed=0).to_bytes()
    import msgpack

    obj = msgpack.unpackb(body, raw=False)
    obj.update(fields)
    with pytest.raises(DecodeError) as err:
        UpdateMessage.from_bytes(msgpack.packb(obj, use_bin_type=True))
    assert err.value.reason is RejectReason.BAD_FIELD
    assert why in str(err.value)
    back = UpdateMessage.from_bytes(update(SITE, 1, 0, 2, seed=0, weight=2.5, contributions=2).to_bytes())
    assert (back.weight, back.contributions, back.is_sum) == (2.5, 2, True)


def test_a_sites_weight_above_what_its_devices_could_weigh_is_cut_to_that_bound() -> None:
    """A device's FedBuff weight is at most max_num_examples (n is clamped to it, s <= 1), so a
    sum of c updates weighs at most c * max_num_examples: a site claiming more is cut to it, as a
    device's own example count is."""
    honest = update("d9", 1, 0, 100, seed=9)
    inflated = update(SITE, 1, 0, 1, seed=1, weight=1e9, contributions=2)
    core = root(3, max_num_examples=100)
    first = core.receive(inflated, topic_agent_id=SITE)
    assert isinstance(first, Accepted)
    assert core.stats.site_weight_cut == 1
    last = core.receive(honest, topic_agent_id="d9")
    assert isinstance(last, Accepted)
    assert last.new_version == 1
    expected, _ = fedbuff_step(model(), [inflated.delta, honest.delta], [2 * 100.0, 100.0])
    for k in SHAPES:
        np.testing.assert_allclose(core.weights[k], expected[k], rtol=1e-5, atol=1e-6)
    # within the bound, the claim stands
    core = root(3, max_num_examples=100)
    assert isinstance(core.receive(update(SITE, 1, 0, 1, seed=1, weight=200.0, contributions=2)), Accepted)
    assert core.stats.site_weight_cut == 0
    assert Stats.from_dict(core.stats.to_dict()) == core.stats


def test_a_sum_of_more_devices_than_the_site_has_is_refused_out_of_range() -> None:
    """aggregator.sites may say how many devices a site has (``site-a:3``): a sum of more is a lie."""
    core = root(10, site_devices={SITE: 3})
    result = core.receive(update(SITE, 1, 0, 1, seed=1, weight=4.0, contributions=4), topic_agent_id=SITE)
    assert isinstance(result, Rejected)
    assert result.reason is RejectReason.OUT_OF_RANGE
    assert "4 devices" in result.detail and "3" in result.detail
    assert core.rule.open_slots() == (0, 10)
    ok = core.receive(update(SITE, 2, 0, 1, seed=2, weight=3.0, contributions=3), topic_agent_id=SITE)
    assert isinstance(ok, Accepted)
    assert core.stats.site_updates == 3


def test_config_reads_how_many_devices_each_site_has() -> None:
    cfg = AggregatorConfig(sites="site-a:40, site-b")
    cfg.validate()
    assert cfg.site_ids == ("site-a", "site-b")
    assert cfg.site_devices == {"site-a": 40}
    for bad in ["site-a:0", "site-a:x", "site-a:", ":3"]:
        with pytest.raises(ConfigError) as err:
            AggregatorConfig(sites=bad).validate()
        assert err.value.key == "aggregator.sites"


def test_config_refuses_sites_with_what_judges_single_updates() -> None:
    AggregatorConfig(sites="site-a, site-b").validate()
    for bad, key in [
        ({"robust": "median"}, "aggregator.robust"),
        ({"rule": "fedasync"}, "aggregator.rule"),
        ({"dp_noise_multiplier": 1.0}, "aggregator.dp_noise_multiplier"),
        ({"sites": "a/b"}, "aggregator.sites"),
    ]:
        with pytest.raises(ConfigError) as err:
            AggregatorConfig(**{"sites": "site-a", **bad}).validate()  # type: ignore[arg-type]
        assert err.value.key == key


# --- the site's uplink -----------------------------------------------------------------------------
def test_devices_are_receipted_from_the_roots_receipt_and_a_resend_gets_it_again() -> None:
    up = UplinkCore(SITE, shard(0))
    a, b = update("d0", 1, 0, 4, seed=0), update("d1", 1, 0, 4, seed=1)
    assert up.update(a, topic_agent="d0", now=0.0) == []
    out = up.update(b, topic_agent="d1", now=0.0)
    assert [type(e) for e in out] == [KeepSum, SendSum]
    assert up.update(a, topic_agent="d0", now=1.0) == []  # held: it is in the sum on its way
    out = up.root_receipt(ReceiptMessage(SITE, 1, "accepted", 7), now=2.0)
    assert isinstance(out[0], Settle)
    assert {(r.agent_id, r.seq, r.status, r.version) for r in receipts(out)} == {
        ("d0", 1, "accepted", 7),
        ("d1", 1, "accepted", 7),
    }
    (again,) = receipts(up.update(a, topic_agent="d0", now=3.0))
    assert (again.status, again.version) == ("accepted", 7)
    assert up.pending == []


def test_a_sum_the_root_condemns_is_rejected_to_its_devices() -> None:
    up = UplinkCore(SITE, shard(0))
    for i in range(2):
        up.update(update(f"d{i}", 1, 0, 4, seed=i), topic_agent=f"d{i}", now=0.0)
    out = up.root_receipt(ReceiptMessage(SITE, 1, "rejected", 40, "too_stale", detail="staleness 40 > 20"), now=1.0)
    got = receipts(out)
    assert {(r.agent_id, r.status, r.reason) for r in got} == {(d, "rejected", "too_stale") for d in ("d0", "d1")}
    assert "staleness 40 > 20" in (got[0].detail or "")
    assert up.condemned["too_stale"] == 1


def test_a_refusal_that_is_no_devices_fault_leaves_the_updates_to_the_outboxes() -> None:
    """The root does not list the site (a deployment fault): no device is told anything; the
    devices' re-sends make a new sum, which the root takes once it is fixed."""
    up = UplinkCore(SITE, shard(0))
    devices = [update(f"d{i}", 1, 0, 4, seed=i) for i in range(2)]
    for u in devices:
        up.update(u, topic_agent=u.agent_id, now=0.0)
    out = up.root_receipt(ReceiptMessage(SITE, 1, "rejected", 0, "not_a_site"), now=1.0)
    assert receipts(out) == []
    assert up.refused["not_a_site"] == 1
    out = [e for u in devices for e in up.update(u, topic_agent=u.agent_id, now=2.0)]
    (msg,) = sent(out)
    assert (msg.seq, msg.contributions) == (2, 2)


def test_a_full_uplink_answers_devices_retry_and_a_root_retry_delays_the_resend() -> None:
    up = UplinkCore(SITE, shard(0, partial_size=1), max_pending=1, resend_after=10.0)
    assert len(sent(up.update(update("d0", 1, 0, 4, seed=0), topic_agent="d0", now=0.0))) == 1
    (busy,) = receipts(up.update(update("d1", 1, 0, 4, seed=1), topic_agent="d1", now=0.0))
    assert (busy.status, busy.reason) == ("retry", "rate_limited")
    assert up.root_receipt(ReceiptMessage(SITE, 1, "retry", 0, "rate_limited", retry_after=3.0), now=1.0) == []
    assert sent(up.due(3.9)) == []
    (resent,) = sent(up.due(4.0))
    assert resent.seq == 1
    assert up.resent == 1


def test_a_device_cannot_pass_a_sum_through_a_site() -> None:
    up = UplinkCore(SITE, shard(0))
    (r,) = receipts(up.update(update("d0", 1, 0, 4, seed=0, weight=4.0, contributions=9), topic_agent="d0", now=0.0))
    assert (r.status, r.reason) == ("rejected", "not_a_site")


def test_a_restarted_site_sends_its_kept_sum_again_and_never_sums_its_updates_anew() -> None:
    up = UplinkCore(SITE, shard(0))
    devices = [update(f"d{i}", 1, 0, 4, seed=i) for i in range(2)]
    out = [e for u in devices for e in up.update(u, topic_agent=u.agent_id, now=0.0)]
    (kept,) = [e for e in out if isinstance(e, KeepSum)]
    (first,) = sent(out)
    # The site dies before the root's receipt; it starts again from its folder.
    again, effects = UplinkCore.restore(SITE, shard(0), kept=[kept.partial], settled=None)
    assert effects == []
    assert [e for u in devices for e in again.update(u, topic_agent=u.agent_id, now=1.0)] == []
    (resent,) = sent(again.due(1.0))
    assert resent.seq == first.seq
    for k in SHAPES:
        np.testing.assert_array_equal(resent.delta[k], first.delta[k])
    new = update("d2", 1, 0, 4, seed=2)
    again.update(new, topic_agent="d2", now=1.0)
    (next_sum,) = sent(again.update(update("d3", 1, 0, 4, seed=3), topic_agent="d3", now=1.0))
    assert next_sum.seq == first.seq + 1


def test_a_site_that_stopped_between_its_two_writes_settles_again_on_restart() -> None:
    up = UplinkCore(SITE, shard(0))
    out = [e for i in range(2) for e in up.update(update(f"d{i}", 1, 0, 4, seed=i), topic_agent=f"d{i}", now=0.0)]
    (kept,) = [e for e in out if isinstance(e, KeepSum)]
    (settle,) = [e for e in up.root_receipt(ReceiptMessage(SITE, 1, "accepted", 3), now=1.0) if isinstance(e, Settle)]
    again, effects = UplinkCore.restore(SITE, shard(0), kept=[kept.partial], settled=settle.state)
    assert [type(e) for e in effects] == [Settle]
    assert sent(again.due(5.0)) == []
    (r,) = receipts(again.update(update("d0", 1, 0, 4, seed=0), topic_agent="d0", now=5.0))
    assert (r.status, r.version) == ("accepted", 3)


@dataclass
class World:
    """Devices, a site with its folder, a real root core, and a network that loses and repeats."""

    rng: random.Random
    site: UplinkCore
    root: AggregatorCore
    folder: dict[int, bytes] = field(default_factory=dict)
    settled: bytes | None = None
    to_root: list[bytes] = field(default_factory=list)
    to_site: list[ReceiptMessage] = field(default_factory=list)
    sums: dict[int, list[tuple[str, int]]] = field(default_factory=dict)
    """Every sum the site kept, by seq: the device updates in it."""
    applied: dict[int, int] = field(default_factory=dict)
    """Sum seq -> the root version its accepted receipt names."""
    device_receipts: list[ReceiptMessage] = field(default_factory=list)

    def carry(self, effects: list[UplinkEffect]) -> None:
        for e in effects:
            if isinstance(e, KeepSum):
                assert e.seq not in self.sums, "a seq names two sums"
                self.folder[e.seq] = e.partial
                self.sums[e.seq] = Partial.from_bytes(e.partial).keys
            elif isinstance(e, SendSum):
                self.send(self.to_root, e.payload)
            elif isinstance(e, Settle):
                self.settled = e.state
                self.folder.pop(e.seq, None)
            else:
                if self.rng.random() < 0.8:
                    self.device_receipts.append(e.receipt)

    def send(self, queue: list, item: object) -> None:
        roll = self.rng.random()
        if roll < 0.15:
            return  # lost
        queue.append(item)
        if roll > 0.9:
            queue.append(item)  # repeated


@pytest.mark.parametrize("seed", range(12))
def test_exactly_once_through_losses_repeats_and_site_crashes(seed: int) -> None:
    rng = random.Random(seed)
    make: Callable[[int], ShardCore] = lambda pid: shard(0, partial_size=3, min_agents=2, first_pid=pid)  # noqa: E731
    # A restarted site numbers its sums from 1 again, but for what its folder says: a seq the
    # root applied, re-used for other updates, would be answered as a duplicate of the first.
    w = World(rng, UplinkCore(SITE, make(1), max_pending=4, resend_after=3.0), root(4, max_staleness=1000))
    outbox = {f"d{i}": list(range(1, 9)) for i in range(5)}
    base = {a: 0 for a in outbox}
    now = 0.0
    for _ in range(600):
        now += 0.5
        roll = rng.random()
        if roll < 0.45:  # a device sends (or re-sends) the oldest update it has no receipt for
            agent = rng.choice(sorted(outbox))
            if outbox[agent]:
                u = update(agent, outbox[agent][0], base[agent], 4, seed=hash((agent, outbox[agent][0])) % 1000)
                w.carry(w.site.update(u, topic_agent=agent, now=now))
        elif roll < 0.75 and w.to_root:  # the root takes a sum
            msg = UpdateMessage.from_bytes(w.to_root.pop(rng.randrange(len(w.to_root))))
            result = w.root.receive(msg, topic_agent_id=SITE, now=now)
            for e in result.effects:
                if isinstance(e, SendReceipt):
                    if e.receipt.status == "accepted":
                        assert w.applied.setdefault(e.receipt.seq, e.receipt.version) == e.receipt.version
                    w.send(w.to_site, e.receipt)
        elif roll < 0.9 and w.to_site:
            w.carry(w.site.root_receipt(w.to_site.pop(0), now=now))
        elif roll < 0.93:  # the site is killed and starts again from its folder
            w.site, effects = UplinkCore.restore(
                SITE, make(1), kept=list(w.folder.values()), settled=w.settled, max_pending=4, resend_after=3.0
            )
            w.carry(effects)
            w.to_site.clear()  # its subscription's queue died with it
            w.carry(w.site.model(w.root.version, None))  # the retained model, at its subscription
        elif roll < 0.96:
            w.carry(w.site.model(w.root.version, None))  # the root's newest model reaches the site
        else:
            w.carry(w.site.due(now))
        for r in w.device_receipts:  # devices drop what is receipted
            if r.status == "accepted" and r.seq in outbox[r.agent_id]:
                outbox[r.agent_id].remove(r.seq)
            assert r.status != "rejected", r
        base = {a: w.site.shard.version for a in outbox}  # devices train on the model the site relays
    # The audit: no device update is in two sums the root applied, and every accepted receipt a
    # device got names the version of the one sum its update went into.
    went: dict[tuple[str, int], int] = {}
    for seq, version in w.applied.items():
        for key in w.sums[seq]:
            assert key not in went, f"{key} applied twice (sum {seq})"
            went[key] = version
    for r in w.device_receipts:
        if r.status == "accepted":
            assert went.get((r.agent_id, r.seq)) == r.version, r
    assert w.root.stats.site_updates == len(went)
    assert len(went) > 10, (w.site.stats(), w.root.stats.to_dict())


# --- secure aggregation inside a site ----------------------------------------------------------------
class SiteFleet:
    """Real SecAgg+ client sessions wired to a site's uplink core, in memory (wire encodings both ways)."""

    def __init__(self, up: UplinkCore, n: int, *, clip_norm: float = 1.0) -> None:
        from fedmq.secagg.client import ClientSession

        self.up, self.clip_norm = up, clip_norm
        self.agents = [f"dev-{i:02d}" for i in range(n)]
        rng = np.random.default_rng(7)
        self.deltas = {a: {k: rng.normal(0, 0.3, s).astype(np.float32) for k, s in SHAPES.items()} for a in self.agents}
        self.sessions: dict[str, ClientSession] = {}
        self.seqs = dict.fromkeys(self.agents, 1)
        self.done: list[tuple[str, object]] = []
        self.receipts: list[ReceiptMessage] = []
        self.sums: list[UpdateMessage] = []
        self.kept: list[Partial] = []
        self.now = 0.0
        self._queue: list[tuple[str, bytes]] = []

    def carry(self, effects: list[UplinkEffect]) -> None:
        from aggregator.uplink import SendSecAgg

        for e in effects:
            if isinstance(e, SendSecAgg):
                self._queue.append((e.agent, e.payload))
            elif isinstance(e, DeviceReceipt):
                self.receipts.append(e.receipt)
            elif isinstance(e, SendSum):
                self.sums.append(UpdateMessage.from_bytes(e.payload))
            elif isinstance(e, KeepSum):
                self.kept.append(Partial.from_bytes(e.partial))

    def check_in(self) -> None:
        from fedmq.secagg.messages import CheckIn

        for a in self.agents:
            self.carry(self.up.secagg(a, CheckIn(a), now=self.now))
        self.pump()

    def pump(self) -> None:
        from fedmq.secagg.client import ClientSession, NeedInput, Send, weighted_input
        from fedmq.secagg.messages import CohortMsg, DoneMsg, decode_down, decode_up

        while self._queue:
            agent, payload = self._queue.pop(0)
            msg = decode_down(payload)
            if isinstance(msg, DoneMsg):
                self.done.append((agent, msg))
                continue
            if isinstance(msg, CohortMsg):
                self.sessions[agent] = ClientSession(agent, msg, now=self.now)
                outs = self.sessions[agent].start()
            else:
                outs = self.sessions[agent].handle(msg)
            for o in outs:
                if isinstance(o, NeedInput):
                    values = weighted_input(self.deltas[agent], clip_norm=self.clip_norm, weight=1.0)
                    outs2 = self.sessions[agent].provide_input(values, seq=self.seqs[agent], base_version=0)
                    for o2 in outs2:
                        if isinstance(o2, Send):
                            self.carry(self.up.secagg(agent, decode_up(o2.message.to_bytes()), now=self.now))
                elif isinstance(o, Send):
                    self.carry(self.up.secagg(agent, decode_up(o.message.to_bytes()), now=self.now))

    def clipped_mean(self, agents: set[str]) -> dict[str, np.ndarray]:
        out = {}
        for k in SHAPES:
            rows = []
            for a in sorted(agents):
                d = self.deltas[a]
                norm = float(np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in d.values())))
                rows.append(d[k] * min(1.0, self.clip_norm / norm))
            out[k] = np.mean(rows, axis=0)
        return out


def secure_site(**kw: object) -> UplinkCore:
    from fedmq.secagg.server import CohortManager, SecAggSettings

    settings = SecAggSettings(cohort_size=4, overselect=0.25, threshold=0.6, min_cohort=3, timeout=5.0)
    n_values = sum(int(np.prod(s)) for s in SHAPES.values()) + 1
    return UplinkCore(SITE, shard(0), cohorts=CohortManager(settings, n_values=n_values), **kw)  # type: ignore[arg-type]


def test_a_secure_site_forwards_only_a_cohorts_sum_and_the_root_steps_with_its_mean() -> None:
    up = secure_site()
    fleet = SiteFleet(up, 5)
    fleet.check_in()
    (msg,) = fleet.sums
    assert (msg.agent_id, msg.contributions) == (SITE, 4)
    assert msg.weight == pytest.approx(4.0, abs=1e-3)  # four weights of s(0) = 1, through the ring
    contributors = {a for a, _ in fleet.kept[0].keys}
    assert len(contributors) == 4
    mean = fleet.clipped_mean(contributors)
    for k in SHAPES:
        np.testing.assert_allclose(msg.delta[k], mean[k], atol=1e-4)
    core = root(4)
    assert isinstance(core.receive(msg, topic_agent_id=SITE, now=1.0), Accepted)
    assert core.version == 1
    for k in SHAPES:
        np.testing.assert_allclose(core.weights[k], model()[k] + mean[k], atol=1e-4)
    # The root's receipt: each contributor gets its receipt, the member left out a DoneMsg.
    fleet.carry(up.root_receipt(ReceiptMessage(SITE, msg.seq, "accepted", 1), now=1.0))
    fleet.pump()
    assert {(r.agent_id, r.status, r.version) for r in fleet.receipts} == {(a, "accepted", 1) for a in contributors}
    (left_out,) = set(fleet.agents) - contributors
    ((agent, done),) = fleet.done
    assert agent == left_out
    assert (done.status, done.included) == ("applied", False)  # type: ignore[attr-defined]


def test_a_secure_site_looks_at_no_plain_update() -> None:
    up = secure_site()
    (r,) = receipts(up.update(update("d0", 1, 0, 4, seed=0), topic_agent="d0", now=0.0))
    assert (r.status, r.reason) == ("rejected", "secure_aggregation_required")
    assert up.shard.accepted == 0


def test_a_masked_upload_of_an_update_in_a_pending_or_applied_sum_is_not_summed_again() -> None:
    up = secure_site()
    fleet = SiteFleet(up, 5)
    fleet.check_in()
    (first,) = fleet.sums
    contributors = sorted(a for a, _ in fleet.kept[0].keys)
    # While the sum is on its way, the same updates in a new cohort are refused as duplicates.
    fleet.check_in()
    assert len(fleet.sums) == 1, "an update in a pending sum was summed again"
    assert up.secagg_refused["duplicate"] >= 3
    fleet.carry(up.root_receipt(ReceiptMessage(SITE, first.seq, "accepted", 1), now=1.0))
    assert {r.agent_id for r in fleet.receipts if r.status == "accepted"} == set(contributors)


def test_a_sum_the_root_refuses_for_no_devices_fault_is_abandoned_for_every_member() -> None:
    up = secure_site()
    fleet = SiteFleet(up, 5)
    fleet.check_in()
    (msg,) = fleet.sums
    fleet.done.clear()
    fleet.carry(up.root_receipt(ReceiptMessage(SITE, msg.seq, "rejected", 0, "not_a_site"), now=1.0))
    fleet.pump()
    assert fleet.receipts == []
    assert sorted(a for a, _ in fleet.done) == fleet.agents
    assert {d.status for _, d in fleet.done} == {"abandoned"}  # type: ignore[attr-defined]
    assert up.pending == []


# --- distributed DP at a secure site ---------------------------------------------------------------
DDP_STDDEV = 0.05


def ddp_cohorts() -> CohortManager:
    """Cohorts that announce distributed DP noise."""
    from fedmq.secagg.messages import Params
    from fedmq.secagg.server import SecAggSettings

    params = Params(clip_norm=1.0, dp_stddev=DDP_STDDEV, dp_survivors=3)
    settings = SecAggSettings(cohort_size=4, overselect=0.25, threshold=0.6, min_cohort=3, timeout=5.0, params=params)
    return CohortManager(settings, n_values=sum(int(np.prod(s)) for s in SHAPES.values()) + 1)


def ddp_site(max_participation: int = 0, **kw: object) -> UplinkCore:
    """A secure site whose cohorts carry distributed DP noise, with a ledger of its devices' releases."""
    return UplinkCore(
        SITE,
        shard(0),
        cohorts=ddp_cohorts(),
        ledger=FederationLedger(1e-5),
        max_participation=max_participation,
        **kw,  # type: ignore[arg-type]
    )


def test_a_secure_site_forwards_a_distributed_dp_sum_over_its_count_and_charges_each_contributor_once() -> None:
    """The noised weights' sum is not divided by (it would scale the step by noise): the site sends
    the noised sum over the number of uploads, DP-FedAvg's fixed denominator, as the aggregator
    does; each contributor's ledger is charged the cohort's release once, when the sum leaves."""
    up = ddp_site()
    fleet = SiteFleet(up, 5)
    fleet.check_in()
    (msg,) = fleet.sums
    assert (msg.agent_id, msg.contributions, msg.weight) == (SITE, 4, 4.0)
    contributors = {a for a, _ in fleet.kept[0].keys}
    mean = fleet.clipped_mean(contributors)
    noise = np.concatenate([(msg.delta[k] - mean[k]).ravel() for k in SHAPES])
    assert 0 < float(np.abs(noise).max()) < 10 * DDP_STDDEV  # noised, by about dp_stddev / 4 per value
    assert up.ledger is not None
    assert {a: up.ledger.count(a) for a in fleet.agents} == {a: int(a in contributors) for a in fleet.agents}
    assert up.stats()["max_epsilon"] == pytest.approx(up.ledger.max_epsilon) and up.ledger.max_epsilon > 0
    core = root(4)
    assert isinstance(core.receive(msg, topic_agent_id=SITE, now=1.0), Accepted)


def test_a_device_at_its_participation_cap_is_refused_at_check_in_by_a_ddp_site() -> None:
    up = ddp_site(max_participation=1)
    fleet = SiteFleet(up, 5)
    fleet.check_in()
    (first,) = fleet.sums
    fleet.carry(up.root_receipt(ReceiptMessage(SITE, first.seq, "accepted", 1), now=1.0))
    fleet.pump()
    fleet.seqs = dict.fromkeys(fleet.agents, 2)
    fleet.now = 10.0
    fleet.check_in()
    assert up.secagg_refused["participation_cap"] == 4
    assert len(fleet.sums) == 1, "a capped device was in another sum"


def test_a_restarted_ddp_site_keeps_its_ledger_and_charges_a_kept_sum_once() -> None:
    """The ledger is written with the sum, before the sum leaves: a site that restarts before the
    root's answer neither forgets the charge nor makes it twice."""
    up = ddp_site()
    fleet = SiteFleet(up, 5)
    effects: list[UplinkEffect] = []
    carry = fleet.carry

    def keep(es: list[UplinkEffect]) -> None:
        effects.extend(es)
        carry(es)

    fleet.carry = keep  # type: ignore[method-assign]
    fleet.check_in()
    (kept,) = [e for e in effects if isinstance(e, KeepSum)]
    assert kept.state is not None
    contributors = {a for a, _ in fleet.kept[0].keys}
    again, _ = UplinkCore.restore(
        SITE, shard(0), kept=[kept.partial], settled=kept.state, cohorts=ddp_cohorts(), ledger=FederationLedger(1e-5)
    )
    assert again.ledger is not None
    assert {a: again.ledger.count(a) for a in fleet.agents} == {a: int(a in contributors) for a in fleet.agents}
    assert again.ledger.max_epsilon == pytest.approx(up.ledger.max_epsilon)  # type: ignore[union-attr]


def test_config_takes_distributed_dp_at_a_secure_site() -> None:
    from fedmq.config import SecAggConfig, UplinkConfig

    cfg = AggregatorConfig(
        secure_aggregation=True,
        secagg=SecAggConfig(dp_epsilon=8.0),
        max_participation=5,
        uplink=UplinkConfig(root="mqtt://root:1883", site_id="hospital-a", state_dir="/tmp"),
    )
    cfg.validate()


# --- secure aggregation at a site that is a shard of a NATS root -----------------------------------
class NatsSite:
    """The decisions of ``fedmq aggregator --site --nats --secure-aggregation``, in memory: the
    site's shard core and cohorts, and the root's leader (what aggregator/site.py moves bytes for)."""

    def __init__(self, k: int = 4) -> None:
        from aggregator.sharding import LeaderCore, LeaderState
        from aggregator.site_cohorts import SiteCohorts
        from fedmq.secagg.server import SecAggSettings

        self.shard = ShardCore(
            SITE, model(), version=0, staleness=S, max_staleness=50, max_update_norm=100.0, max_num_examples=1000,
            partial_size=2, partial_wait=5.0, min_agents=2, stale_by_commit=True,
        )  # fmt: skip
        settings = SecAggSettings(cohort_size=4, overselect=0.25, threshold=0.6, min_cohort=3, timeout=5.0)
        n_values = sum(int(np.prod(s)) for s in SHAPES.values()) + 1
        self.cohorts = SiteCohorts(self.shard, CohortManager(settings, n_values=n_values))
        self.leader = LeaderCore(LeaderState(0, model(), AppliedWindow()), buffer_size=k)
        self.offers: list[Partial] = []

    def secagg(self, agent: str, msg: object, *, now: float) -> list[object]:
        return self.carry(self.cohorts.message(agent, msg, now=now, run=None))  # type: ignore[arg-type]

    def carry(self, effects: list[object]) -> list[object]:
        """As aggregator/site.py does: offers to the leader, receipts and cohort messages to the devices."""
        from aggregator.sharding import Offer, Receipt, Settled

        out: list[object] = []
        receipted: set[str] = set()
        for e in effects:
            if isinstance(e, Offer):
                self.offers.append(e.partial)
            elif isinstance(e, Receipt):
                receipted.add(e.receipt.agent_id)
                out.append(DeviceReceipt(e.receipt))
            elif isinstance(e, Settled):
                status = "applied" if e.applied else "abandoned"
                out += self.cohorts.settled(e.pid, status, e.version, e.reason, skip=set() if e.applied else receipted)
            else:
                out.append(e)
        return out

    def lead(self) -> list[object]:
        """The leader takes every offer; a step is committed and followed by the site."""
        out: list[object] = []
        while self.offers:
            answer, step = self.leader.offer(self.offers.pop(0))
            out += self.carry(self.shard.answer(answer))  # type: ignore[arg-type]
            if step is not None:
                self.leader.committed()
                out += self.carry(self.shard.commit(step.state.version, step.state.window))  # type: ignore[arg-type]
        return out


def test_a_secure_nats_site_offers_a_cohorts_sum_and_receipts_it_from_the_commit() -> None:
    site = NatsSite(k=4)
    fleet = SiteFleet(site, 5)  # type: ignore[arg-type]
    fleet.check_in()
    (partial,) = site.offers
    contributors = {c.agent_id for c in partial.contributions}
    assert len(contributors) == 4 and partial.total == pytest.approx(4.0, abs=1e-3)
    mean = fleet.clipped_mean(contributors)
    fleet.carry(site.lead())  # type: ignore[arg-type]
    fleet.pump()
    assert site.leader.state.version == 1
    for k in SHAPES:
        np.testing.assert_allclose(site.leader.state.weights[k], model()[k] + mean[k], atol=1e-4)
    assert {(r.agent_id, r.status, r.version) for r in fleet.receipts} == {(a, "accepted", 1) for a in contributors}
    ((agent, done),) = fleet.done
    assert agent not in contributors and (done.status, done.included) == ("applied", False)  # type: ignore[attr-defined]


def test_a_secure_nats_sites_sum_the_root_refuses_for_good_is_abandoned_for_its_members() -> None:
    """A cohort's sum has no messages to hand back to the stream: refused, its members keep their updates."""
    site = NatsSite(k=4)
    fleet = SiteFleet(site, 5)  # type: ignore[arg-type]
    fleet.check_in()
    (partial,) = site.offers
    first = partial.contributions[0].key
    window = AppliedWindow()
    window.add([first], 1)  # the root has one of its updates already (the site restarted, say)
    from aggregator.sharding import LeaderCore, LeaderState

    site.leader = LeaderCore(LeaderState(1, model(), window), buffer_size=4)
    site.shard.window = window
    fleet.done.clear()
    fleet.carry(site.lead())  # type: ignore[arg-type]
    fleet.pump()
    assert {(r.agent_id, r.status) for r in fleet.receipts} == {(first[0], "accepted")}
    assert sorted(a for a, _ in fleet.done) == sorted(set(fleet.agents) - {first[0]})
    assert {d.status for _, d in fleet.done} == {"abandoned"}  # type: ignore[attr-defined]
    assert not site.shard.holds(partial.contributions[1].key), "the others may upload their updates again"


def test_config_takes_secure_aggregation_and_distributed_dp_at_a_nats_site_with_a_stable_id() -> None:
    from fedmq.config import SecAggConfig, ShardConfig, UplinkConfig

    site = ShardConfig(nats="nats://127.0.0.1:4222", site=True)
    AggregatorConfig(shard=site, secure_aggregation=True).validate()
    with pytest.raises(ConfigError) as err:
        AggregatorConfig(shard=ShardConfig(nats="nats://127.0.0.1:4222"), secure_aggregation=True).validate()
    assert err.value.key == "aggregator.secure_aggregation"
    ddp = {"secure_aggregation": True, "secagg": SecAggConfig(dp_epsilon=8.0), "max_participation": 2}
    with pytest.raises(ConfigError) as err:  # the ledger needs a name that outlives the process
        AggregatorConfig(shard=site, **ddp).validate()  # type: ignore[arg-type]
    assert err.value.key == "aggregator.uplink.site_id"
    AggregatorConfig(shard=site, uplink=UplinkConfig(site_id="hospital-a"), **ddp).validate()  # type: ignore[arg-type]


def test_a_member_left_out_of_one_sum_hears_of_it_though_it_is_in_another_that_one_commit_settles() -> None:
    """One commit can settle two cohorts' sums; a device summed in the first and left out of the
    second is receipted for the first and still told the second went on without it."""
    from aggregator.sharding import Receipt, Settled
    from aggregator.site_cohorts import SendSecAgg
    from fedmq.secagg.messages import decode_down

    site = NatsSite()
    c1, c2 = "1" * 32, "2" * 32
    site.cohorts._members[1] = (c1, ("a", "b", "c"), frozenset({"a", "b", "c"}))
    site.cohorts._members[2] = (c2, ("a", "d", "e"), frozenset({"d", "e"}))
    commit = [Receipt(ReceiptMessage(x, 1, "accepted", 1)) for x in "abc"]
    commit += [Settled(1, 1, True), *(Receipt(ReceiptMessage(x, 1, "accepted", 1)) for x in "de"), Settled(2, 1, True)]
    told = [e for e in site.carry(commit) if isinstance(e, SendSecAgg)]  # type: ignore[arg-type]
    assert [e.agent for e in told] == ["a"]
    done = decode_down(told[0].payload)
    assert (done.cohort, done.status, done.included) == (c2, "applied", False)  # type: ignore[union-attr]
