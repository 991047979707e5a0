"""Tier 1: sharded FedBuff (aggregator/sharding.py) against the single-process rule, and
exactly-once under shard crashes, leader crashes, redeliveries and device re-sends."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.rules.fedbuff import fedbuff_step
from aggregator.sharding import (
    STALE,
    Ack,
    AppliedWindow,
    Contribution,
    LeaderCore,
    LeaderState,
    Nak,
    Offer,
    Partial,
    Receipt,
    Refused,
    Settled,
    ShardCore,
    Step,
    Taken,
)
from fedmq.errors import DecodeError
from fedmq.messages import ReceiptMessage, UpdateMessage
from fedmq.staleness import make_staleness_fn

SHAPES = {"W": (6, 3), "b": (3,)}


def model(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


def update(agent: str, seq: int, base: int, n: int, seed: int) -> UpdateMessage:
    rng = np.random.default_rng(seed)
    delta = {k: (0.1 * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}
    return UpdateMessage(agent, seq, base, n, delta)


def shard(
    name: str, version: int = 0, partial_size: int = 3, max_staleness: int = 10, stale_by_commit: bool = False
) -> ShardCore:
    return ShardCore(
        name,
        model(),
        version=version,
        staleness=make_staleness_fn("polynomial", 0.5),
        max_staleness=max_staleness,
        max_update_norm=100.0,
        max_num_examples=1000,
        partial_size=partial_size,
        partial_wait=5.0,
        stale_by_commit=stale_by_commit,
    )


def offers(effects: list[object]) -> list[Partial]:
    return [e.partial for e in effects if isinstance(e, Offer)]


def test_a_step_over_partials_is_fedbuffs_step_over_the_same_updates() -> None:
    """Two shards, partials of 3 and 2; K = 5: the leader's model is FedBuff's over the 5 updates."""
    w0 = model()
    leader = LeaderCore(LeaderState(2, w0, AppliedWindow()), buffer_size=5, server_lr=0.7)
    a, b = shard("a", version=2), shard("b", version=2, partial_size=2)
    ups = [update(f"d{i}", 1, base=i % 3, n=10 + i, seed=i) for i in range(5)]
    made = []
    for i, u in enumerate(ups):
        made += offers((a if i < 3 else b).update(i, u, topic_agent=u.agent_id, now=0.0))
    assert [len(p.contributions) for p in made] == [3, 2]
    answer, step = leader.offer(made[0])
    assert isinstance(answer, Taken) and step is None
    answer, step = leader.offer(made[1])
    assert step is not None and step.state.version == 3
    s = make_staleness_fn("polynomial", 0.5)
    weights = [u.num_examples * s(2 - u.base_version) for u in ups]
    expected, _ = fedbuff_step(w0, [u.delta for u in ups], weights, server_lr=0.7)
    for k in w0:
        np.testing.assert_allclose(step.state.weights[k], expected[k], rtol=1e-5, atol=1e-6)
    assert sorted(step.keys) == sorted((u.agent_id, 1) for u in ups)


def test_a_partial_round_trips_and_a_bad_one_is_refused_by_name() -> None:
    a = shard("a", partial_size=2)
    a.update(1, update("x", 1, 0, 5, 1), topic_agent="x", now=0.0)
    (p,) = offers(a.update(2, update("y", 4, 0, 5, 2), topic_agent="y", now=0.0))
    back = Partial.from_bytes(p.to_bytes())
    assert back.keys == p.keys and back.total == p.total and back.pid == p.pid
    np.testing.assert_array_equal(back.tensors["W"], p.tensors["W"])
    twice = Partial(p.shard, p.pid, p.version, p.contributions * 2, 2 * p.total, p.tensors)
    with pytest.raises(DecodeError, match="twice"):
        Partial.from_bytes(twice.to_bytes())
    wrong_total = Partial(p.shard, p.pid, p.version, p.contributions, p.total + 1.0, p.tensors)
    with pytest.raises(DecodeError, match="total"):
        Partial.from_bytes(wrong_total.to_bytes())
    leader = LeaderCore(LeaderState(0, model(), AppliedWindow()), buffer_size=10)
    poisoned = {**p.tensors, "b": np.full(3, np.nan, np.float32)}
    nan = Partial(p.shard, p.pid, p.version, p.contributions, p.total, poisoned)
    answer, _ = leader.offer(nan)
    assert isinstance(answer, Refused) and "not finite" in answer.reason


def test_a_shard_refuses_and_acknowledges_what_can_never_be_applied() -> None:
    a = shard("a", version=20)
    out = a.update(1, update("x", 1, 2, 5, 1), topic_agent="x", now=0.0)  # staleness 18 > 10
    assert out[0] == Ack((1,)) and isinstance(out[1], Receipt) and out[1].receipt.reason == "too_stale"
    out = a.update(2, update("x", 2, 20, 5, 1), topic_agent="spoofer", now=0.0)
    assert out[0] == Ack((2,)) and isinstance(out[1], Receipt) and out[1].receipt.reason == "agent_id_mismatch"
    out = a.update(3, update("x", 3, 21, 5, 1), topic_agent="x", now=0.0)  # a version this shard has not seen
    assert out == [Nak((3,))]
    bad = update("x", 4, 20, 5, 1)
    bad.delta["W"][0, 0] = np.inf
    assert a.update(4, bad, topic_agent="x", now=0.0)[1].receipt.reason == "non_finite"  # type: ignore[union-attr]
    assert a.holding == 0


# --- exactly once: a miniature cluster -------------------------------------------------------------


@dataclass
class Stream:
    """A work queue with redelivery: what the JetStream consumer does for the service."""

    queue: list[int] = field(default_factory=list)
    held: dict[int, str] = field(default_factory=dict)  # token -> shard holding it
    acked: set[int] = field(default_factory=set)


class Cluster:
    """Shards, a leader and a stream, driven by a random schedule; the audit at the end."""

    def __init__(
        self, rng: random.Random, n_shards: int, k: int, partial_size: int, max_staleness: int = 10**6
    ) -> None:
        self.rng = rng
        self.k = k
        self.partial_size = partial_size
        self.max_staleness = max_staleness
        self.messages: dict[int, UpdateMessage] = {}
        self.stream = Stream()
        self.shards = {f"s{i}": self.new_shard(f"s{i}") for i in range(n_shards)}
        self.committed = LeaderState(0, model(), AppliedWindow())
        self.leader = LeaderCore(self.committed, buffer_size=k)
        self.steps: list[tuple[int, tuple[tuple[str, int], ...]]] = []
        self.receipts: dict[tuple[str, int], set[int]] = {}
        self.answers: dict[tuple[str, int], set[str]] = {}  # every status a device was told
        self.inbox: list[tuple[str, Partial]] = []  # offers on their way to the leader
        self.restarts = 0

    def publish(self, u: UpdateMessage) -> None:
        token = len(self.messages) + 1
        self.messages[token] = u
        self.stream.queue.append(token)

    def run(self, effects: list[object], name: str) -> None:
        for e in effects:
            if isinstance(e, Ack):
                for t in e.tokens:
                    self.stream.held.pop(t, None)
                    self.stream.acked.add(t)
            elif isinstance(e, Nak):
                for t in e.tokens:
                    if self.stream.held.pop(t, None) is not None:
                        self.stream.queue.append(t)
            elif isinstance(e, Receipt):
                self.answers.setdefault((e.receipt.agent_id, e.receipt.seq), set()).add(e.receipt.status)
                if e.receipt.status == "accepted":
                    self.receipts.setdefault((e.receipt.agent_id, e.receipt.seq), set()).add(e.receipt.version)
            elif isinstance(e, Offer):
                self.inbox.append((name, e.partial))

    def new_shard(self, name: str) -> ShardCore:
        return shard(name, partial_size=self.partial_size, max_staleness=self.max_staleness, stale_by_commit=True)

    def deliver(self) -> None:
        if not self.stream.queue:
            return
        token = self.stream.queue.pop(self.rng.randrange(len(self.stream.queue)))
        name = self.rng.choice(sorted(self.shards))
        self.stream.held[token] = name
        u = self.messages[token]
        self.run(self.shards[name].update(token, u, topic_agent=u.agent_id, now=0.0), name)

    def lead(self) -> None:
        if not self.inbox:
            return
        name, partial = self.inbox.pop(0)
        answer, step = self.leader.offer(partial)
        if step is not None:
            self.leader.committed()
        if self.shards[name].shard == partial.shard:  # the answer reaches the process that offered
            self.run(self.shards[name].answer(answer), name)
        if step is not None:
            self.announce(step)

    def announce(self, step: Step) -> None:
        self.committed = step.state
        self.steps.append((step.state.version, step.keys))
        for n, s in self.shards.items():
            self.run(s.commit(step.state.version, step.state.window.copy()), n)

    def last_call(self) -> None:
        """The stream ends: the leader steps with whatever it holds, and with every offer after."""
        self.leader.buffer_size = 1
        if self.leader.pending_step() is not None:
            self.announce(self.leader.committed())

    def crash_shard(self) -> None:
        name = self.rng.choice(sorted(self.shards))
        for t, holder in list(self.stream.held.items()):  # ack_wait runs out: redelivered
            if holder == name:
                del self.stream.held[t]
                self.stream.queue.append(t)
        self.restarts += 1  # a new process: a new id (the service draws one per start)
        fresh = self.new_shard(f"{name}.{self.restarts}")
        fresh.version, fresh.window = self.committed.version, self.committed.window.copy()
        self.shards[name] = fresh  # its offers already on their way may still reach the leader

    def crash_leader(self) -> None:
        self.leader = LeaderCore(self.committed, buffer_size=self.k)  # from the committed state
        self.inbox.clear()
        for name, s in self.shards.items():
            self.run(s.new_leader(), name)

    def tick(self) -> None:
        for name, s in self.shards.items():
            self.run(s.flush(), name)

    def chaos(self, steps: int, resend: Callable[[], UpdateMessage], fresh: Callable[[], None] | None = None) -> None:
        """A random schedule: deliveries, offers, shard and leader crashes, flushes, device re-sends
        (and, with ``fresh``, devices' new updates)."""
        moves: list[tuple[float, Callable[[], None]]] = [
            (0.4, self.deliver), (0.35, self.lead), (0.05, self.crash_shard), (0.03, self.crash_leader),
            (0.07, self.tick), (0.05, lambda: self.publish(resend())),
        ]  # fmt: skip
        if fresh is not None:
            moves.append((0.05, fresh))
        for _ in range(steps):
            self.rng.choices([m for _, m in moves], weights=[w for w, _ in moves])[0]()

    def drain(self, fresh: Callable[[], None] | None = None) -> None:
        """No more crashes, no buffer left short of K; ``fresh`` every 200 rounds: the federation goes on."""
        self.last_call()
        for i in range(20_000):
            if not (self.stream.queue or self.inbox or any(s.holding for s in self.shards.values())):
                return
            self.deliver()
            self.lead()
            self.tick()
            if fresh is not None and i % 200 == 199:
                fresh()  # a refusal is settled by the next commit
        raise AssertionError("the cluster did not drain")


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n_shards=st.integers(1, 3),
    k=st.integers(1, 6),
    partial_size=st.integers(1, 4),
    n_updates=st.integers(1, 25),
)
def test_every_update_is_applied_exactly_once_whatever_crashes(
    seed: int, n_shards: int, k: int, partial_size: int, n_updates: int
) -> None:
    """Devices re-send; shards and the leader crash at random; messages are redelivered.
    Drained, every update went into exactly one committed step, and every receipt a device got
    names that step's version."""
    rng = random.Random(seed)
    c = Cluster(rng, n_shards, k, partial_size)
    sent = [update(f"d{i % 5}", i, 0, 1 + i % 7, i) for i in range(n_updates)]
    for u in sent:
        c.publish(u)
    c.chaos(400, resend=lambda: rng.choice(sent))  # a device re-sends when its receipt was late
    c.drain()
    applied = [key for _, keys in c.steps for key in keys]
    assert len(applied) == len(set(applied)), "an update went into two steps"
    assert sorted(applied) == sorted({(u.agent_id, u.seq) for u in sent}), "an update was lost"
    step_of = {key: v for v, keys in c.steps for key in keys}
    for key, versions in c.receipts.items():
        assert versions == {step_of[key]}, f"{key} was receipted with {versions}, applied in {step_of[key]}"
    assert set(c.stream.acked) == set(c.messages), "a message was never acknowledged"


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n_shards=st.integers(2, 3),
    k=st.integers(1, 4),
    partial_size=st.integers(1, 3),
    n_updates=st.integers(2, 25),
)
def test_a_device_gets_one_answer_per_update_when_updates_grow_too_stale(
    seed: int, n_shards: int, k: int, partial_size: int, n_updates: int
) -> None:
    """With a small ``max_staleness``, a re-sent copy can reach a shard after the version moved
    on while its first copy still waits, unreceipted, in another shard's partial. Whatever the
    schedule, a device is never told both ``rejected`` and ``accepted`` for one update, a
    refused update is in no step, and every update is settled one way or the other."""
    rng = random.Random(seed)
    c = Cluster(rng, n_shards, k, partial_size, max_staleness=1)
    sent: list[UpdateMessage] = []

    def new_update() -> None:  # a device trains on a model at most 3 versions old
        base = rng.randint(max(0, c.committed.version - 3), c.committed.version)
        sent.append(update(f"d{len(sent) % 5}", len(sent), base, 1 + len(sent) % 7, len(sent)))
        c.publish(sent[-1])

    for _ in range(n_updates):
        new_update()
    c.chaos(400, resend=lambda: rng.choice(sent), fresh=new_update)
    c.drain(fresh=new_update)
    applied = [key for _, keys in c.steps for key in keys]
    assert len(applied) == len(set(applied)), "an update went into two steps"
    for key, statuses in c.answers.items():
        assert len(statuses) == 1, f"{key} was answered {sorted(statuses)}"
        assert (statuses == {"accepted"}) == (key in set(applied)), f"{key}: told {statuses}, applied {key in applied}"
    assert {(u.agent_id, u.seq) for u in sent} <= set(c.answers) | set(applied), "an update was never settled"
    step_of = {key: v for v, keys in c.steps for key in keys}
    for key, versions in c.receipts.items():
        assert versions == {step_of[key]}
    assert set(c.stream.acked) == set(c.messages), "a message was never acknowledged"


def test_a_copy_too_stale_at_one_shard_while_its_first_copy_waits_at_another_gets_one_answer() -> None:
    """The race, step by step: ``x``'s update waits in shard A's offer while B's updates move the
    version on by 2 (max_staleness 1); ``x`` re-sends it and B gets the copy. B must not refuse it
    on its own: A's partial then commits it."""
    c = Cluster(random.Random(0), 2, k=1, partial_size=1, max_staleness=1)
    a, b = c.shards["s0"], c.shards["s1"]
    u = update("x", 1, 0, 5, 1)
    c.publish(u)
    c.stream.held[1] = "s0"
    c.run(a.update(1, u, topic_agent="x", now=0.0), "s0")  # A offers {x1}: on its way to the leader
    assert len(c.inbox) == 1
    for seq, base in ((1, 0), (2, 1)):  # B's updates, each a step (K = 1): version 2
        y = update("y", seq, base, 5, 10 + seq)
        c.publish(y)
        token = len(c.messages)
        c.stream.held[token] = "s1"
        c.run(b.update(token, y, topic_agent="y", now=0.0), "s1")
        c.inbox.append(c.inbox.pop(0))  # A's offer stays behind
        c.lead()
    assert c.committed.version == 2 and b.version == 2
    c.publish(u)  # x re-sends: B gets the copy, staleness 2 > 1
    c.stream.held[4] = "s1"
    c.run(b.update(4, u, topic_agent="x", now=0.0), "s1")
    c.run(b.due(now=10.0), "s1")
    while c.inbox:
        c.lead()
    assert c.answers.get(("x", 1), {"accepted"}) == {"accepted"}
    assert [v for v, keys in c.steps if ("x", 1) in keys] == [3]


def test_a_refusal_rides_in_a_partial_counts_nothing_towards_k_and_is_settled_by_the_next_step() -> None:
    """A cluster's shard holds a too-stale update and lists it as refused; the leader commits it
    as STALE with its next step, and only then is the device told ``rejected`` (once)."""
    a = shard("a", version=5, partial_size=2, max_staleness=1, stale_by_commit=True)
    assert a.update(1, update("x", 1, 2, 5, 1), topic_agent="x", now=0.0) == []  # staleness 3 > 1: held
    assert a.holding == 1 and a.rejected == {}
    assert a.update(2, update("x", 1, 2, 5, 1), topic_agent="x", now=1.0) == [Ack((2,))]  # a re-send: held already
    (refusals,) = offers(a.due(now=10.0))  # refusals alone leave after partial_wait
    assert refusals.contributions == () and refusals.refused == (("x", 1),)
    assert refusals.total == 0.0 and refusals.tensors == {}
    assert Partial.from_bytes(refusals.to_bytes()) == refusals
    with_sum = Partial("a", 9, 5, (), 0.0, model(), (("x", 2),))
    with pytest.raises(DecodeError, match="no update and no refusal"):
        Partial.from_bytes(Partial("a", 9, 5, (), 0.0, {}, ()).to_bytes())

    leader = LeaderCore(LeaderState(5, model(), AppliedWindow()), buffer_size=1)
    assert leader.offer(with_sum)[0] == Refused("a", 9, "a partial of refusals only carries a sum")
    answer, step = leader.offer(refusals)
    assert answer == Taken("a", refusals.pid) and step is None and leader.buffered == 0  # no step for refusals
    assert a.answer(answer) == []
    b = shard("b", version=5, partial_size=1)
    (p,) = offers(b.update(1, update("y", 1, 5, 5, 2), topic_agent="y", now=0.0))
    _, step = leader.offer(p)
    assert step is not None and step.keys == (("y", 1),) and step.state.refused == (("x", 1),)
    leader.committed()
    assert step.state.window.get(("x", 1)) == STALE
    out = a.commit(step.state.version, step.state.window)
    assert out[0] == Ack((1,)) and len(out) == 3 and isinstance(out[1], Receipt)
    assert out[2] == Settled(refusals.pid, step.state.version, True)
    assert (out[1].receipt.status, out[1].receipt.reason) == ("rejected", "too_stale")
    assert a.rejected == {"too_stale": 1} and a.holding == 0
    again = a.update(3, update("x", 1, 2, 5, 1), topic_agent="x", now=20.0)  # a late re-send: the same answer
    assert again[0] == Ack((3,)) and again[1].receipt.status == "rejected"  # type: ignore[union-attr]
    # A partial holding the update itself, offered after the refusal was committed, is a duplicate.
    late = Partial("c", 1, 5, (Contribution("x", 1, 1.0, 3),), 1.0, model(), ())
    assert leader.offer(late)[0] == Refused("c", 1, "duplicates", (("x", 1),))


def test_sharding_refuses_at_startup_what_it_does_not_do_naming_the_key() -> None:
    """Sharded aggregation is FedBuff's weighted mean: the rest fails fast, by key."""
    from fedmq.config import AggregatorConfig, Config, ShardConfig
    from fedmq.errors import ConfigError

    on = ShardConfig(nats="nats://127.0.0.1:4222")
    Config(aggregator=AggregatorConfig(shard=on)).validate()
    for change, key in [
        ({"rule": "fedasync"}, "aggregator.rule"),
        ({"robust": "median"}, "aggregator.robust"),
        ({"secure_aggregation": True}, "aggregator.secure_aggregation"),
        ({"server_momentum": 0.9}, "aggregator.server_momentum"),
    ]:
        with pytest.raises(ConfigError) as err:
            Config(aggregator=AggregatorConfig(shard=on, **change)).validate()  # type: ignore[arg-type]
        assert err.value.key == key
    with pytest.raises(ConfigError) as err:
        Config(aggregator=AggregatorConfig(shard=ShardConfig(nats="mqtt://x:1"))).validate()
    assert err.value.key == "aggregator.shard.nats"


def test_a_site_sum_leaves_only_with_updates_of_enough_devices() -> None:
    """min_agents: neither the size nor the wait lets a partial of one device's updates out."""
    site = ShardCore(
        "site",
        model(),
        version=0,
        staleness=make_staleness_fn("constant"),
        max_staleness=10,
        max_update_norm=100.0,
        max_num_examples=1000,
        partial_size=2,
        partial_wait=1.0,
        min_agents=2,
    )
    assert site.update(1, update("a", 1, 0, 5, 1), topic_agent="a", now=0.0) == []
    assert site.update(2, update("a", 2, 0, 5, 2), topic_agent="a", now=0.0) == []  # size reached, one device
    assert site.due(now=10.0) == []  # waited long enough, still one device
    assert site.flush() == [Nak((1, 2))]  # at shutdown: handed back, never sent alone
    site.update(3, update("a", 3, 0, 5, 3), topic_agent="a", now=20.0)
    (partial,) = offers(site.update(4, update("b", 1, 0, 5, 4), topic_agent="b", now=20.0))
    assert {c.agent_id for c in partial.contributions} == {"a", "b"}


def test_a_held_message_delivered_again_stays_held_and_unacknowledged() -> None:
    """Its ack wait ran out and the stream handed it back to the same shard: acknowledging it
    now would let the stream forget an update no commit holds yet."""
    a = shard("a", partial_size=5)
    u = update("x", 1, 0, 5, 1)
    assert a.update(7, u, topic_agent="x", now=0.0) == []
    assert a.update(7, u, topic_agent="x", now=1.0) == []  # the same message (token 7): nothing to do
    assert a.holding == 1
    assert a.update(8, u, topic_agent="x", now=1.0) == [Ack((8,))]  # a device's re-send: the first copy holds


async def test_a_shard_sends_acks_and_receipts_in_order_and_survives_a_failed_one() -> None:
    """The shard's one sender (a TaskGroup child): a send the cluster fails is counted and the
    rest still go, in the order the core decided; a bug of ours ends the sender."""
    from nats.errors import ConnectionClosedError

    from aggregator.cluster import ClusterAggregator
    from fedmq.config import AggregatorConfig, Config, ShardConfig

    sent: list[tuple[str, object]] = []

    class Msg:
        def __init__(self, token: int, fail: bool = False) -> None:
            self.token, self.fail = token, fail

        async def ack(self) -> None:
            if self.fail:
                raise ConnectionClosedError
            sent.append(("ack", self.token))

        async def nak(self, delay: float) -> None:
            sent.append(("nak", self.token))

        async def in_progress(self) -> None:
            sent.append(("progress", self.token))

    class Connection:
        async def publish(self, subject: str, body: bytes) -> None:
            sent.append(("publish", subject))

    config = Config(aggregator=AggregatorConfig(shard=ShardConfig(nats="nats://127.0.0.1:1"))).validate()
    shard_ = ClusterAggregator(config, shard_id="s1")
    shard_._nc = Connection()
    shard_._msgs = {1: Msg(1), 2: Msg(2, fail=True), 3: Msg(3), 5: Msg(5)}
    receipt = ReceiptMessage("dev-a", 1, "accepted", 1)
    shard_._carry([Ack((1, 2)), Receipt(receipt), Nak((3,))])
    shard_._out.put_nowait(("progress", 1))  # a keep-alive is not sent for a message acked meanwhile
    shard_._out.put_nowait(("progress", 5))  # and is for one still held
    async with asyncio.TaskGroup() as tg:
        sender = tg.create_task(shard_._sender())
        await shard_._out.join()
        sender.cancel()
    assert sent == [("ack", 1), ("publish", shard_.names["receipt"] + "dev-a"), ("nak", 3), ("progress", 5)]
    assert shard_.send_failures == 1 and list(shard_._msgs) == [5]

    shard_._msgs = {4: object()}  # no ack(): our bug, not the cluster's
    shard_._carry([Ack((4,))])
    with pytest.raises(ExceptionGroup) as err:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(shard_._sender())
    assert err.group_contains(AttributeError)
