"""The aggregator service under secure aggregation, at its seam, with a real state folder.

Devices here are client sessions with an outbox (an update stays until its receipt, or until
a cohort that summed it says so). The service is fed their frames through ``handle`` and its
published frames are read off its queues. A crash is the process vanishing between two inputs:
everything fsync'd stays, nothing else; a new service then opens the same folder. The crash
points are every round of the protocol, and the moment after a sum was applied and logged but
before anyone heard of it.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from aggregator.service import AggregatorService
from edge_agent.outbox import Outbox
from fedmq.codec import DecodeLimits
from fedmq.config import AggregatorConfig, Config, SecAggConfig
from fedmq.messages import ModelMessage, ReceiptMessage, UpdateMessage
from fedmq.secagg.client import Aborted, ClientSession, Finished, NeedInput, Output, Send, weighted_input
from fedmq.secagg.messages import CheckIn, CohortMsg, decode_down
from tests.cipher_rng import CipherRng

N = 12


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def make_service(folder: Path, clock: Clock, **overrides: object) -> AggregatorService:
    """A service over ``folder``; ``overrides`` are AggregatorConfig fields."""
    agg = AggregatorConfig(
        rule="fedbuff",
        buffer_size=10,
        server_lr=1.0,
        secure_aggregation=True,
        secagg=SecAggConfig(overselect=0.2, timeout=5.0),
        checkpoint_dir=str(folder),
        checkpoint_every=1,
        rate_limit=0.0,
    )
    agg = replace(agg, **overrides)  # type: ignore[arg-type]
    svc = AggregatorService(Config(prefix="fedmq/sa", aggregator=agg).validate(), clock=clock)
    svc.startup()
    return svc


class Devices:
    """Twelve devices with outboxes, talking to whichever service is alive."""

    def __init__(self, svc: AggregatorService, clock: Clock) -> None:
        self.svc, self.clock = svc, clock
        self.agents = [f"dev-{i:02d}" for i in range(N)]
        self.sessions: dict[str, ClientSession] = {}
        self.outbox: dict[str, dict[int, bytes]] = {a: {} for a in self.agents}
        self.assigned: dict[str, int] = {}
        self.seq = {a: 0 for a in self.agents}
        self.settled: dict[tuple[str, int], list[ReceiptMessage]] = {}
        self.rng = CipherRng(1)

    def model(self) -> ModelMessage:
        view = self.svc._model_view
        assert view is not None
        return view

    def stage(self, agent: str) -> None:
        """Train: put a new update in the outbox unless one waits for a cohort."""
        if any(self.assigned.get(agent) != seq for seq in self.outbox[agent]):
            return  # one waits for a cohort already
        self.seq[agent] += 1
        core = self.svc.core
        assert core is not None
        delta = {k: self.rng.normal(0, 0.05, v.shape).astype(v.dtype) for k, v in core.weights.items()}
        update = UpdateMessage(agent, self.seq[agent], core.version, 8, delta)
        self.outbox[agent][self.seq[agent]] = update.to_bytes()

    async def check_in(self) -> None:
        for a in self.agents:
            self.stage(a)
            await self.svc.handle(self.svc.topics.secagg_up(a), CheckIn(a).to_bytes())

    async def step(self) -> bool:
        """Deliver one message the service published; False when there was none."""
        svc = self.svc
        if not svc._receipts.empty():
            receipt = svc._receipts.get_nowait()
            self.settled.setdefault((receipt.agent_id, receipt.seq), []).append(receipt)
            self.outbox[receipt.agent_id].pop(receipt.seq, None)
            return True
        if svc._secagg_out.empty():
            return False
        topic, payload = svc._secagg_out.get_nowait()
        agent = topic.rsplit("/", 1)[1]
        msg = decode_down(payload)
        if isinstance(msg, CohortMsg):
            self.sessions[agent] = ClientSession(agent, msg, now=self.clock())
            outs = self.sessions[agent].start()
        elif agent in self.sessions:
            outs = self.sessions[agent].handle(msg)
        else:
            return True
        for o in outs:
            if isinstance(o, NeedInput):
                if not self.outbox[agent]:
                    continue  # nothing trained yet: the session waits (the test's check_in trains)
                seq = min(q for q in self.outbox[agent])
                update = UpdateMessage.from_bytes(self.outbox[agent][seq])
                values = weighted_input(update.delta, clip_norm=1.0, weight=1.0)
                self.assigned[agent] = seq
                outs += self.sessions[agent].provide_input(values, seq=seq, base_version=update.base_version)
            elif isinstance(o, Send):
                await svc.handle(svc.topics.secagg_up(agent), o.message.to_bytes())
            elif isinstance(o, Finished):
                seq = self.assigned.pop(agent, None)
                if o.included and seq is not None:
                    self.outbox[agent].pop(seq, None)
        return True

    async def run_until(self, phase: str | None) -> None:
        """Deliver until the open cohort reaches ``phase`` (None: until nothing is left)."""
        while True:
            core = self.svc.core
            assert core is not None and core.secagg is not None
            if phase is not None and phase in core.secagg.in_flight().values():
                return
            if not await self.step():
                return

    def expire(self) -> None:
        """Past every device's deadline: sessions that never heard the end are over."""
        self.clock.t += 60
        for a, s in list(self.sessions.items()):
            if s.expired(self.clock()):
                del self.sessions[a]
                self.assigned.pop(a, None)


async def crash_and_restart(devices: Devices, folder: Path, clock: Clock) -> AggregatorService:
    """The process vanishes (nothing more is written or sent); a new one opens the folder."""
    old = devices.svc
    assert old.store is not None and old.store.wal is not None
    assert old.store.wal.unsynced == 0  # what was acknowledged is on disk (each input flushes here)
    old.store.wal.close()
    svc = AggregatorService(old.config, clock=clock)
    svc.startup()
    await svc.settle_restart()
    devices.svc = svc
    return svc


@pytest.mark.parametrize("phase", ["collecting_keys", "collecting_shares", "collecting_inputs", "collecting_reveals"])
async def test_a_crash_in_any_round_abandons_the_cohort_and_the_next_one_sums(tmp_path: Path, phase: str) -> None:
    clock = Clock()
    devices = Devices(make_service(tmp_path, clock), clock)
    await devices.check_in()
    await devices.run_until(phase)
    assert devices.svc.core is not None and devices.svc.core.version == 0
    svc = await crash_and_restart(devices, tmp_path, clock)
    core = svc.core
    assert core is not None and core.version == 0 and core.stats.cohorts_abandoned == 1
    assert core.open_cohorts == {}
    await devices.run_until(None)  # the abandonment reaches the devices
    assert all(type(s.state) is Aborted for s in devices.sessions.values())
    assert not devices.assigned  # every update is free for the next cohort
    await devices.check_in()
    await devices.run_until(None)
    assert core.version == 1 and core.stats.cohorts_applied == 1 and core.stats.accepted == 10
    once = [r for r in devices.settled.values() if r]
    assert len(once) == 10 and all(len(r) == 1 for r in once)
    # A third process: the sum was logged once and is replayed once.
    svc3 = await crash_and_restart(devices, tmp_path, clock)
    assert svc3.core is not None and svc3.core.version == 1 and svc3.core.stats.accepted == 10
    assert all(np.array_equal(svc3.core.weights[k], v) for k, v in core.weights.items())


async def test_devices_hear_of_a_cohort_only_once_its_opening_is_on_disk(tmp_path: Path) -> None:
    """A cohort a device heard of is one a restart can abandon: its first messages wait for the fsync.

    The process dies at the fsync that would make the cohort's opening durable (simulated: the
    sync fails and nothing after the last durable record survives). Sent at once, the cohort's
    messages had reached its devices, and the restarted aggregator, which never knew the
    cohort, could not tell them it was over: they waited out their timeout and their uploads
    were refused as ``wrong_cohort`` (CI's kill -9 test saw one such kill: 3 cohorts abandoned
    for 4 kills, and 9 wrong_cohort refusals).
    """
    clock = Clock()
    devices = Devices(make_service(tmp_path, clock), clock)
    svc = devices.svc
    assert svc.store is not None and svc.store.wal is not None and svc.core is not None

    def dies() -> None:
        raise OSError(5, "the process dies before this fsync")

    svc.store.wal.sync = dies  # type: ignore[method-assign]
    await devices.check_in()
    assert svc.core.secagg is not None and svc.core.secagg.in_flight(), "a cohort formed (in memory)"
    sent = []
    while not svc._secagg_out.empty():
        sent.append(decode_down(svc._secagg_out.get_nowait()[1]))
    assert not [m for m in sent if isinstance(m, CohortMsg)], "devices heard of a cohort the log does not hold"
    restarted = AggregatorService(svc.config, clock=clock)
    restarted.startup()
    assert restarted.core is not None and restarted.core.open_cohorts == {}


async def test_a_crash_after_the_sum_is_logged_applies_it_once(tmp_path: Path) -> None:
    """The last reveal arrives, the sum is applied and fsync'd; the process dies before any receipt goes out."""
    clock = Clock()
    devices = Devices(make_service(tmp_path, clock), clock)
    await devices.check_in()
    first = devices.svc
    while first.core is not None and first.core.version == 0:
        assert await devices.step()
    weights = {k: v.copy() for k, v in first.core.weights.items()}
    # Nothing of what the sum made is delivered: the receipts and DoneMsgs die with the process.
    svc = await crash_and_restart(devices, tmp_path, clock)
    core = svc.core
    assert core is not None and core.version == 1 and core.stats.accepted == 10
    assert all(np.array_equal(core.weights[k], v) for k, v in weights.items())
    assert not devices.settled and core.stats.cohorts_abandoned == 0
    # The devices time out and check in with the same updates: those already summed are duplicates.
    devices.expire()
    await devices.check_in()
    await devices.run_until(None)
    await asyncio.sleep(0)
    assert core.stats.duplicates == 10 and not core.stats.rejected  # answered with their receipts
    assert core.version == 1  # twelve devices, ten repeats: too few new ones for a sum; nothing twice
    receipts = [r for rs in devices.settled.values() for r in rs]
    assert len(receipts) == 10 and {r.version for r in receipts} == {1}
    assert sorted(r.index for r in receipts if r.index is not None) == list(range(1, 11))
    # With the repeats settled, the next cohort has twelve fresh updates again.
    devices.expire()
    await devices.check_in()
    await devices.run_until(None)
    assert core.version == 2 and core.stats.accepted == 20, (core.stats.to_dict(), core.secagg.in_flight())


async def test_the_model_message_announces_secure_aggregation(tmp_path: Path) -> None:
    clock = Clock()
    svc = make_service(tmp_path, clock)
    svc._mark_model_dirty()
    view = svc._model_view
    assert view is not None and view.secagg is not None
    decoded = ModelMessage.from_bytes(replace(view, created_at=1.0).to_bytes())
    assert decoded.secagg == view.secagg and decoded.secagg.max_staleness == svc.cfg.max_staleness


class Agents:
    """Devices that run the agent's own protocol logic (:class:`edge_agent.secure.SecureUploads`).

    Delivery is adversarial in one respect the network allows: a device hears every
    secure-aggregation message queued for it before any receipt (they travel on different
    topics, and the aggregator releases a receipt only once its group is on disk).
    """

    def __init__(self, svc: AggregatorService, clock: Clock, folder: Path, doubt_timeout: float = 30.0) -> None:
        from edge_agent.secure import SecureUploads

        self.svc, self.clock = svc, clock
        self.agents = [f"dev-{i:02d}" for i in range(N)]
        self.outboxes = {a: Outbox(folder / a, max_items=64) for a in self.agents}
        self.uploads = {
            a: SecureUploads(
                a,
                self.outboxes[a],
                DecodeLimits(),
                signer=None,
                verifier=None,
                checkin_interval=0.0,
                doubt_timeout=doubt_timeout,
            )
            for a in self.agents
        }
        self.seq = dict.fromkeys(self.agents, 0)
        self.receipts: list[ReceiptMessage] = []
        self.late: list[list[ReceiptMessage]] = []
        self.rng = CipherRng(2)

    def model(self) -> ModelMessage:
        self.svc._mark_model_dirty()
        view = self.svc._model_view
        assert view is not None
        return view

    def train(self, agent: str) -> None:
        if not self.uploads[agent].needs_update():
            return
        core = self.svc.core
        assert core is not None
        self.seq[agent] += 1
        delta = {k: self.rng.normal(0, 0.05, v.shape).astype(v.dtype) for k, v in core.weights.items()}
        update = UpdateMessage(agent, self.seq[agent], core.version, 8, delta)
        self.outboxes[agent].put(self.seq[agent], update.to_bytes())

    async def send(self, agent: str, outs: list[Output]) -> None:
        from edge_agent.secure import messages

        for msg in messages(outs):
            await self.svc.handle(self.svc.topics.secagg_up(agent), msg.to_bytes())

    async def serve(self, agent: str, model: ModelMessage) -> None:
        """As the agent's loop does after each message: mask an update as soon as the session asks."""
        up = self.uploads[agent]
        if up.waiting_for_input:
            picked = up.input_for(model)
            if picked is None:  # none free in the outbox: train one
                self.train(agent)
                picked = up.input_for(model)
            assert picked is not None
            await self.send(agent, up.provide(*picked, self.clock()))

    async def tick(self) -> None:
        """Each device's loop once: check in when free, then serve its session."""
        model = self.model()
        for a, up in self.uploads.items():
            checkin = up.check_in(self.clock(), model)
            if checkin is not None:
                await self.svc.handle(self.svc.topics.secagg_up(a), checkin.to_bytes())
            await self.serve(a, model)

    async def deliver(self, *, receipt_lag: int, twice: bool = False) -> None:
        """One round: what the service has queued for the devices; receipts ``receipt_lag`` rounds late.

        ``twice``: every protocol message arrives a second time (QoS 1 is at least once).
        """
        svc = self.svc
        protocol = [svc._secagg_out.get_nowait() for _ in range(svc._secagg_out.qsize())]
        if twice:
            protocol = [m for m in protocol for _ in range(2)]
        self.late.append([svc._receipts.get_nowait() for _ in range(svc._receipts.qsize())])
        for topic, payload in protocol:
            agent = topic.rsplit("/", 1)[1]
            await self.send(agent, self.uploads[agent].on_message(payload, self.clock()))
            await self.serve(agent, self.model())
        while len(self.late) > receipt_lag:
            self.settle(self.late.pop(0))

    def settle(self, receipts: list[ReceiptMessage]) -> None:
        """Receipts arrive, as the agent takes them."""
        for receipt in receipts:
            self.receipts.append(receipt)
            if self.outboxes[receipt.agent_id].remove(receipt.seq):
                self.uploads[receipt.agent_id].settled(receipt.seq, self.clock(), accepted=receipt.status == "accepted")


@pytest.mark.parametrize(
    ("overselect", "twice"),
    [(0.0, False), (0.5, False), (0.5, True)],
    ids=["all-summed", "late-uploads-left-out", "every-message-twice"],
)
async def test_a_device_that_hears_of_its_next_cohort_before_its_receipt_does_not_upload_again(
    tmp_path: Path, overselect: float, twice: bool
) -> None:
    """A summed device goes back to the pool at once, so its next cohort's announcement can
    overtake the receipt of its last upload. The agent must not take that upload, whose fate
    it does not know yet, as the next cohort's input: the aggregator would refuse it as a
    duplicate and the cohort would lose a member."""
    clock = Clock()
    svc = make_service(tmp_path / "agg", clock, buffer_size=6, secagg=SecAggConfig(overselect=overselect, timeout=5.0))
    agents = Agents(svc, clock, tmp_path / "devices")
    core = svc.core
    assert core is not None
    for _ in range(200):  # each round: the devices' loops, then one delivery of what was queued
        await agents.tick()
        await agents.deliver(receipt_lag=3, twice=twice)  # the next cohort reaches its input round first
        clock.t += 0.1
        if core.stats.cohorts_applied >= 4:
            break
    assert core.stats.cohorts_applied >= 4, core.stats.to_dict()
    agents.settle([r for batch in agents.late for r in batch])
    agents.settle([svc._receipts.get_nowait() for _ in range(svc._receipts.qsize())])
    assert not core.stats.rejected and core.stats.duplicates == 0, core.stats.to_dict()
    accepted = [(r.agent_id, r.seq) for r in agents.receipts if r.status == "accepted"]
    assert len(accepted) == len(set(accepted)) == core.stats.accepted
    assert sum(up.stats.in_doubt for up in agents.uploads.values()) > 0  # the race did happen


async def test_an_upload_in_doubt_is_offered_again_after_the_timeout_and_summed_once(tmp_path: Path) -> None:
    """No receipt ever arrives: after ``doubt_timeout`` each device offers its summed update to
    another cohort, which the aggregator answers with the original receipt and never sums again."""
    clock = Clock()
    svc = make_service(tmp_path / "agg", clock, buffer_size=6, secagg=SecAggConfig(overselect=0.0, timeout=5.0))
    agents = Agents(svc, clock, tmp_path / "devices", doubt_timeout=1.0)
    core = svc.core
    assert core is not None
    for _ in range(300):
        await agents.tick()
        await agents.deliver(receipt_lag=10**6)
        clock.t += 0.1
        if core.stats.duplicates >= 12:
            break
    assert core.stats.duplicates >= 12 and not core.stats.rejected, core.stats.to_dict()
    receipts: dict[tuple[str, int], set[tuple[int, int | None]]] = {}
    queued = [svc._receipts.get_nowait() for _ in range(svc._receipts.qsize())]
    for r in [r for batch in agents.late for r in batch] + queued:
        assert r.status == "accepted", r
        receipts.setdefault((r.agent_id, r.seq), set()).add((r.version, r.index))
    assert all(len(v) == 1 for v in receipts.values())  # a repeat is answered with the same receipt
    assert len(receipts) == core.stats.accepted  # each update summed once
    assert sum(up.stats.in_doubt for up in agents.uploads.values()) >= 12
