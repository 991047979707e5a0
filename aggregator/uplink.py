"""A site's uplink to a root aggregator over MQTT: sums of device updates, exactly once (sans-IO).

Hierarchical aggregation (docs/scale-out.md): a hospital's or a building's devices publish to the
site's own broker; the site aggregator checks their updates and sums them
(:class:`~aggregator.sharding.ShardCore`, the shards' own code), and sends the root each sum as
one weighted update over the ordinary update protocol (:attr:`UpdateMessage.weight`,
:attr:`UpdateMessage.contributions`). The root, an ordinary ``fedmq aggregator`` that lists the
site in ``aggregator.sites``, puts it into its FedBuff buffer (Nguyen et al., AISTATS 2022,
arXiv:2106.06639) as the ``contributions`` updates it holds, weighted ``weight * s(staleness)``.

**Weights.** The site weighs device ``i`` ``c_i = n_i s(v - b_i)``, where ``v`` is the newest
root version it has seen (the sum's ``base_version``) and ``b_i`` the version the device trained
on, and sends ``sum_i c_i delta_i / sum_i c_i`` with ``weight = sum_i c_i``. The root multiplies
by ``s(V - v)`` for the versions that passed meanwhile. Its step is then FedBuff's over the
devices' own updates, exactly when ``V = v`` (and for every ``V`` with constant staleness).

**Exactly once.** The sum's identity at the root is ``(site_id, seq)``, and the root answers a
re-sent one with its original receipt. So the site

1. writes each sum to its uplink folder (:class:`KeepSum`) before it sends it (:class:`SendSum`);
2. sends it again, with the same seq, until the root's receipt comes (``resend_after``, and after
   a restart: :meth:`UplinkCore.restore`);
3. counts a device's update that is in a kept sum as held: a re-send of it is not summed again;
4. answers its devices only from the root's receipt: ``accepted`` with the version the sum went
   into, also to a re-send later (the settled window is kept in the folder, :class:`Settle`).

A device's receipt thus means what it means with a single aggregator: the root has the update
in its write-ahead log. A sum the root refuses for a reason that condemns its updates (too stale,
another run or model) is answered ``rejected`` to each device; any other refusal is a fault of the
deployment (the root does not list the site, say): it is logged and counted, the devices get no
answer, and their outboxes send the updates again.

**Secure aggregation inside the site.** With ``cohorts`` (a
:class:`~fedmq.secagg.server.CohortManager`), the site serves SecAgg+ cohorts to its devices as an
aggregator does (Bell et al., CCS 2020) and takes no plain update: it learns each cohort's sum
and nothing of one device's update, and that sum is what it forwards. The sum is
``sum_i w_i delta_i`` with the weights the devices applied themselves (``w_i = s(staleness)``,
clipped deltas), so the root gets ``weight = sum_i w_i`` (the cohort's decoded weight sum), taken
against the site's version when the masks came off. Contributors get their receipts from the
root's answer; the other members of the cohort a :class:`~fedmq.secagg.messages.DoneMsg`. A
cohort that the site abandons, or a sum the root refuses for no device's fault, ends as
``abandoned`` for its members, who keep their updates for a later cohort.

**Distributed DP inside the site.** With noise announced to the cohorts (``Params.dp_stddev``,
calibrated for ``aggregator.secagg.dp_epsilon`` by :func:`aggregator.cohorts.with_distributed_dp`),
each device adds its share of discrete Gaussian noise before masking (Kairouz, Liu and Steinke,
ICML 2021, arXiv:2102.06387), so what leaves the site is a differentially private release: the
root, and whoever reads its broker, learn a noised sum. The noised weights' sum is not divided
by (that would scale the step by noise): the site sends the sum over the number of uploads,
DP-FedAvg's fixed denominator (McMahan et al., ICLR 2018), with ``weight`` that number. The site
keeps the devices' ledger (:class:`~aggregator.privacy.FederationLedger`): each contributor is
charged the cohort's release when its sum leaves, a device in ``max_participation`` sums (or
whose last sum is fewer than ``min_separation`` root versions old) is refused at check-in, and the
ledger is written with each sum, before it is sent, so a restart neither forgets nor repeats a
charge.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from aggregator.privacy import FederationLedger
from aggregator.sharding import Ack, AppliedWindow, Contribution, Nak, Offer, Partial, Receipt, ShardCore, ShardEffect
from fedmq.codec import DEFAULT_LIMITS, DecodeLimits, pack, unpack
from fedmq.errors import RejectReason
from fedmq.messages import ReceiptMessage, UpdateMessage
from fedmq.secagg.messages import CheckIn, DoneMsg, MaskedMsg, UpMessage
from fedmq.secagg.server import Abandoned, CohortManager, Formed, Reject, SendTo, Unmasked

SETTLED_SCHEMA = 1
CONDEMNING = frozenset(
    {
        RejectReason.TOO_STALE,
        RejectReason.WRONG_RUN,
        RejectReason.UNKNOWN_BASE_VERSION,
        RejectReason.SHAPE_MISMATCH,
        RejectReason.MODEL_MISMATCH,
        RejectReason.BAD_DTYPE,
    }
)
"""Root refusals that condemn the updates in a sum (they would be refused from the device itself)."""


# --- effects -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KeepSum:
    """Write this sum to the uplink folder, durably, before the :class:`SendSum` that follows."""

    seq: int
    partial: bytes
    """:meth:`Partial.to_bytes`: what :meth:`UplinkCore.restore` takes back."""
    state: bytes | None = None
    """With a ledger: the settled state charged for this sum, to write (durably) before the sum."""


@dataclass(frozen=True)
class SendSum:
    """Publish this update (a sum) to the root, QoS 1."""

    seq: int
    payload: bytes


@dataclass(frozen=True)
class Settle:
    """The root answered sum ``seq`` for good: write ``state`` (the settled window), then forget the kept sum."""

    seq: int
    state: bytes


@dataclass(frozen=True)
class DeviceReceipt:
    """Send a device its receipt on the site's broker."""

    receipt: ReceiptMessage


@dataclass(frozen=True)
class SendSecAgg:
    """Send a device a secure-aggregation message on its ``secagg/down`` topic (the site's broker)."""

    agent: str
    payload: bytes


UplinkEffect = KeepSum | SendSum | Settle | DeviceReceipt | SendSecAgg


@dataclass
class _Pending:
    partial: Partial
    due: float
    """When to send it (again)."""
    sends: int = 0


class UplinkCore:
    """Decides what a site sends the root and answers its devices; it takes values, returns effects.

    Inputs: :meth:`update` (a device's decoded update), :meth:`model` (a root model seen),
    :meth:`root_receipt` (the root's answer to a sum), :meth:`due` (time passed) and
    :meth:`flush` (shutdown).
    """

    def __init__(
        self,
        site_id: str,
        shard: ShardCore,
        *,
        max_pending: int = 16,
        resend_after: float = 30.0,
        window: AppliedWindow | None = None,
        run: str | None = None,
        cohorts: CohortManager | None = None,
        ledger: FederationLedger | None = None,
        max_participation: int = 0,
        min_separation: int = 0,
    ) -> None:
        if max_pending < 1 or not (math.isfinite(resend_after) and resend_after > 0):
            raise ValueError("need max_pending >= 1 and resend_after > 0")
        if (max_participation or min_separation) and ledger is None:
            raise ValueError("participation limits need a ledger")
        if max_participation < 0 or min_separation < 0:
            raise ValueError("max_participation and min_separation must be >= 0")
        self.site_id = site_id
        self.shard = shard
        self.max_pending = max_pending
        self.resend_after = resend_after
        self.run = run
        self.window = window or AppliedWindow()
        self.shard.window = self.window
        self._pending: dict[int, _Pending] = {}
        self._tokens = 0
        self.sent = 0
        self.resent = 0
        self.accepted_sums = 0
        self.accepted_updates = 0
        self.condemned: Counter[str] = Counter()
        """Sums the root refused for good, by reason (their devices got ``rejected``)."""
        self.refused: Counter[str] = Counter()
        """Sums the root refused for a reason that is no device's fault (logged; the devices send again)."""
        self.busy = 0
        """Device updates answered ``retry`` because ``max_pending`` sums await their receipt."""
        self.cohorts = cohorts
        self._cohort_version: dict[str, int] = {}
        self._members: dict[int, tuple[str, tuple[str, ...]]] = {}
        """A cohort's sum on its way: seq -> (cohort, members), to tell the members how it ended."""
        self.secagg_refused: Counter[str] = Counter()
        """Secure-aggregation messages refused, by reason (the cohort goes on without them)."""
        self.cohorts_dropped: Counter[str] = Counter()
        """Cohorts whose sum the site could not use, by reason (their members are told ``abandoned``)."""
        self.ledger = ledger
        """Under distributed DP: every device's releases (the sums of its that left the site)."""
        self.max_participation = max_participation
        self.min_separation = min_separation

    # --- restart -------------------------------------------------------------------------------
    @classmethod
    def restore(
        cls,
        site_id: str,
        shard: ShardCore,
        *,
        kept: list[bytes],
        settled: bytes | None,
        limits: DecodeLimits = DEFAULT_LIMITS,
        **kwargs: Any,
    ) -> tuple[UplinkCore, list[UplinkEffect]]:
        """The uplink of a site that starts again from its folder: the kept sums and the settled state.

        Returns the core and the effects to carry out first: a kept sum the settled window already
        holds (the site stopped between the two writes) is settled again; every other one is sent
        at the first :meth:`due`, with its seq. New sums are numbered past every seq used before
        (the settled state records the next one): a seq never names two sums.
        """
        window = None
        if settled is not None:
            obj = unpack(settled, limits)
            if obj.get("schema") != SETTLED_SCHEMA:
                raise ValueError(f"uplink state schema {obj.get('schema')!r}, expected {SETTLED_SCHEMA}")
            window = AppliedWindow.from_wire(obj["window"])
            shard.reserve(int(obj["next_seq"]))
        core = cls(site_id, shard, window=window, **kwargs)
        if settled is not None and core.ledger is not None and obj.get("privacy") is not None:
            core.ledger.load_state_dict(obj["privacy"])  # (none: distributed DP is new here, nothing was charged)
        effects: list[UplinkEffect] = []
        for body in kept:
            partial = Partial.from_bytes(body, limits)
            if all(core.window.get(k) is not None for k in partial.keys):
                effects.append(Settle(partial.pid, core._state()))
                continue
            shard.restore(partial)
            core._pending[partial.pid] = _Pending(partial, due=-math.inf, sends=1)  # sent by the previous life
        return core, effects

    def _state(self) -> bytes:
        state: dict[str, Any] = {
            "schema": SETTLED_SCHEMA,
            "window": self.window.to_wire(),
            "next_seq": self.shard.next_pid,
        }
        if self.ledger is not None:
            state["privacy"] = self.ledger.state_dict()
        return pack(state)

    # --- inputs --------------------------------------------------------------------------------
    def update(self, update: UpdateMessage, *, topic_agent: str, now: float) -> list[UplinkEffect]:
        """A device's update, decoded and checked by :meth:`UpdateMessage.from_bytes`."""
        if update.is_sum:
            return [self._refusal(update, topic_agent, RejectReason.NOT_A_SITE, "a site takes no sums from devices")]
        if self.cohorts is not None:
            why = "this site takes only masked updates (secure aggregation); the update was not looked at"
            return [self._refusal(update, topic_agent, RejectReason.SECURE_AGGREGATION_REQUIRED, why)]
        if self.run is not None and update.base_run is not None and update.base_run != self.run:
            why = f"trained on run {update.base_run}, this federation runs {self.run}"
            return [self._refusal(update, topic_agent, RejectReason.WRONG_RUN, why)]
        if len(self._pending) >= self.max_pending and self.window.get((update.agent_id, update.seq)) is None:
            self.busy += 1
            receipt = ReceiptMessage(
                topic_agent,
                update.seq,
                "retry",
                self.shard.version,
                RejectReason.RATE_LIMITED.value,
                retry_after=round(min(self.resend_after, 5.0), 3),
                detail=f"the site holds {len(self._pending)} sums the root has not receipted yet",
            )
            return [DeviceReceipt(receipt)]
        self._tokens += 1
        return self._carry(self.shard.update(self._tokens, update, topic_agent=topic_agent, now=now), now)

    def _refusal(self, update: UpdateMessage, agent: str, reason: RejectReason, detail: str) -> DeviceReceipt:
        self.shard.rejected[reason.value] = self.shard.rejected.get(reason.value, 0) + 1
        receipt = ReceiptMessage(agent, update.seq, "rejected", self.shard.version, reason.value, detail=detail)
        return DeviceReceipt(receipt)

    def model(self, version: int, run: str | None) -> list[UplinkEffect]:
        """The root published ``version``: staleness is taken against it from now on."""
        self.run = run
        return self._carry(self.shard.commit(version, self.window), 0.0)

    def secagg(self, agent: str, msg: UpMessage, *, now: float) -> list[UplinkEffect]:
        """A device's secure-aggregation message (from the topic of ``agent``), when the site serves cohorts."""
        if self.cohorts is None:
            self.secagg_refused[RejectReason.WRONG_COHORT.value] += 1
            return []
        version = self.shard.version
        out: list[UplinkEffect] = []
        if isinstance(msg, CheckIn):
            refusal = self._participation(agent)
            if refusal is not None:  # not in the pool: a capped device is done, a separated one checks in again
                self.secagg_refused[refusal.value] += 1
                return []
            outs = self.cohorts.check_in(agent, msg, now, version=version, run=self.run)
        else:
            outs = self.cohorts.receive(agent, msg, now, check=self._admit_masked)
            if isinstance(msg, MaskedMsg):
                applied = self.window.get((agent, msg.seq))
                if applied is not None:  # a re-send of an applied update: its receipt again
                    out.append(DeviceReceipt(ReceiptMessage(agent, msg.seq, "accepted", applied)))
        out += self._cohort_outputs(outs, now)
        if not isinstance(msg, CheckIn):  # a cohort may have ended: its devices are back in the pool
            out += self._cohort_outputs(self.cohorts.form(now, version=version, run=self.run), now)
        return out

    def _participation(self, agent: str) -> RejectReason | None:
        """Why ``agent`` may not join another cohort now (its ledger), if so; as the aggregator's core decides."""
        if self.ledger is None:
            return None
        if self.max_participation and self.ledger.count(agent) >= self.max_participation:
            return RejectReason.PARTICIPATION_CAP
        last = self.ledger.last.get(agent)
        if self.min_separation and last is not None and self.shard.version - last < self.min_separation:
            return RejectReason.PARTICIPATION_WINDOW
        return None

    def offline(self, agent: str, *, now: float) -> list[UplinkEffect]:
        """A device went offline (its Will): its cohort stops waiting for it."""
        return self._cohort_outputs(self.cohorts.offline(agent, now), now) if self.cohorts is not None else []

    def _admit_masked(self, agent: str, msg: MaskedMsg) -> Reject | None:
        key = (agent, msg.seq)
        if msg.agent_id != agent:
            return Reject(agent, RejectReason.AGENT_ID_MISMATCH, f"the upload names {msg.agent_id!r}")
        if self.window.get(key) is not None:
            return Reject(agent, RejectReason.DUPLICATE, f"seq {msg.seq} was applied before")
        if self.shard.holds(key):
            return Reject(agent, RejectReason.DUPLICATE, f"seq {msg.seq} is in a sum on its way to the root")
        refusal = self._participation(agent)  # checked at check-in too; this holds whatever put it in a cohort
        if refusal is not None:
            return Reject(agent, refusal, f"{agent!r} may join no sum now (its privacy ledger)")
        version = self.shard.version
        if msg.base_version > version:
            return Reject(agent, RejectReason.UNKNOWN_BASE_VERSION, f"base version {msg.base_version} > {version}")
        if version - msg.base_version > self.shard.max_staleness:
            why = f"staleness {version - msg.base_version} > max {self.shard.max_staleness}"
            return Reject(agent, RejectReason.TOO_STALE, why)
        return None

    def _cohort_outputs(self, outs: list[Any], now: float) -> list[UplinkEffect]:
        out: list[UplinkEffect] = []
        for o in outs:
            if isinstance(o, SendTo):
                out.append(SendSecAgg(o.agent, o.message.to_bytes()))
            elif isinstance(o, Reject):
                self.secagg_refused[o.reason.value] += 1
            elif isinstance(o, Formed):
                self._cohort_version[o.cohort] = self.shard.version
            elif isinstance(o, Abandoned):
                self._cohort_version.pop(o.cohort, None)  # (its members are told by the manager)
            elif isinstance(o, Unmasked):
                out += self._forward_cohort(o, now)
        return out

    def _forward_cohort(self, u: Unmasked, now: float) -> list[UplinkEffect]:
        """A cohort's sum becomes the site's next sum to the root (kept, then sent)."""
        self._cohort_version.pop(u.cohort, None)
        version = self.shard.version
        reference = self.shard.reference
        values = u.values
        # Under distributed DP the weights' sum is noised too: the fixed denominator is the count.
        weight = float(values[-1]) if u.release is None else float(len(u.contributors))
        size = sum(r.size for r in reference.values())
        why = None
        if values.shape != (size + 1,) or not np.isfinite(values).all():
            why = "the sum is not finite or not the model's size"
        elif not weight > 0:
            why = f"the weights sum to {weight!r}"
        elif u.release is not None and self.ledger is None:
            why = "a distributed DP sum needs the site's ledger"  # our wiring's fault: never forwarded uncharged
        if why is not None:
            self.cohorts_dropped[why] += 1
            done = DoneMsg(u.cohort, "abandoned", version, why)
            return [SendSecAgg(a, done.to_bytes()) for a in u.members]
        tensors: dict[str, Any] = {}
        offset = 0
        for k in sorted(reference):
            ref = reference[k]
            tensors[k] = values[offset : offset + ref.size].reshape(ref.shape).astype(ref.dtype)
            offset += ref.size
        # The devices weighed their own updates; the sum hides each one's share: split evenly.
        share = weight / len(u.contributors)
        contributions = [Contribution(c.agent, c.seq, share, max(0, version - c.base_version)) for c in u.contributors]
        total = math.fsum(c.weight for c in contributions)
        if u.release is not None:
            assert self.ledger is not None
            self.ledger.record([c.agent for c in u.contributors], u.release, version + 1)  # as the core does
            for c in u.contributors:  # spent, or too recently in a sum: out of the pool the cohort put them in
                if self.cohorts is not None and self._participation(c.agent) is not None:
                    self.cohorts.leave(c.agent)
        offer = self.shard.adopt(version, contributions, total, tensors)
        self._members[offer.partial.pid] = (u.cohort, u.members)
        return self._carry([offer], now)

    def _tell_members(
        self, seq: int, status: str, version: int, reason: str | None, *, skip: set[str]
    ) -> list[UplinkEffect]:
        """How a cohort's sum ended, to its members that no receipt tells."""
        cohort = self._members.pop(seq, None)
        if cohort is None:
            return []
        done = DoneMsg(cohort[0], status, version, reason, included=False if status == "applied" else None)  # type: ignore[arg-type]
        return [SendSecAgg(a, done.to_bytes()) for a in cohort[1] if a not in skip]

    def due(self, now: float) -> list[UplinkEffect]:
        """Time passed: an open sum that waited ``partial_wait`` leaves; unanswered sums are sent again."""
        out = self._carry(self.shard.due(now), now)
        if self.cohorts is not None:
            out += self._cohort_outputs(self.cohorts.tick(now, version=self.shard.version, run=self.run), now)
        for seq in sorted(self._pending):
            p = self._pending[seq]
            if p.due <= now:
                out.append(self._send(p, now))
        return out

    def flush(self, now: float) -> list[UplinkEffect]:
        """Shutdown: the open sum leaves if it holds enough devices (it is kept, and sent again after a restart)."""
        return self._carry(self.shard.flush(), now)

    def root_receipt(self, receipt: ReceiptMessage, *, now: float) -> list[UplinkEffect]:
        """The root's answer to one of this site's sums."""
        p = self._pending.get(receipt.seq)
        if p is None or receipt.agent_id != self.site_id:
            return []  # an answer to a re-send of a sum settled already
        if receipt.status == "retry":
            p.due = now + max(receipt.retry_after or 1.0, 0.05)
            return []
        if receipt.status == "accepted" or receipt.reason == RejectReason.DUPLICATE.value:
            # A duplicate the root no longer has the receipt of was applied all the same: settled
            # with the root's version now (at or after the one it went into), never summed again.
            del self._pending[receipt.seq]
            self.window.add(p.partial.keys, receipt.version)
            self.accepted_sums += 1
            self.accepted_updates += len(p.partial.contributions)
            out: list[UplinkEffect] = [Settle(receipt.seq, self._state())]
            out += self._carry(self.shard.commit(receipt.version, self.window), now)
            summed = {c.agent_id for c in p.partial.contributions}
            return out + self._tell_members(receipt.seq, "applied", receipt.version, None, skip=summed)
        reason = receipt.reason or "unknown"
        if reason not in {r.value for r in CONDEMNING}:
            # No device's fault: the sum is dropped, its devices' outboxes send the updates again.
            del self._pending[receipt.seq]
            self.shard.drop(receipt.seq)
            self.refused[reason] += 1
            why = f"the root refused the site's sum ({reason})"
            told = self._tell_members(receipt.seq, "abandoned", receipt.version, why, skip=set())
            return [Settle(receipt.seq, self._state()), *told]
        del self._pending[receipt.seq]
        self.shard.drop(receipt.seq)
        self.condemned[reason] += 1
        detail = f"the root refused the site's sum ({reason}): {receipt.detail or ''}"[:200]
        out = [Settle(receipt.seq, self._state())]
        for c in p.partial.contributions:
            r = ReceiptMessage(c.agent_id, c.seq, "rejected", receipt.version, reason, detail=detail)
            out.append(DeviceReceipt(r))
        summed = {c.agent_id for c in p.partial.contributions}
        return out + self._tell_members(receipt.seq, "abandoned", receipt.version, detail, skip=summed)

    # --- reading -------------------------------------------------------------------------------
    @property
    def pending(self) -> list[int]:
        """Seqs of the sums sent and not yet answered."""
        return sorted(self._pending)

    def stats(self) -> dict[str, Any]:
        """Counters for the site's summary and metrics."""
        return {
            "site": self.site_id,
            "version": self.shard.version,
            "device_updates_taken": self.shard.accepted,
            "device_updates_rejected": dict(self.shard.rejected),
            "sums_sent": self.sent,
            "sums_resent": self.resent,
            "sums_accepted": self.accepted_sums,
            "updates_accepted": self.accepted_updates,
            "sums_condemned": dict(self.condemned),
            "sums_refused": dict(self.refused),
            "pending": len(self._pending),
            "busy": self.busy,
            **(
                {
                    "cohorts_formed": self.cohorts.formed,
                    "cohorts_summed": self.cohorts.applied,
                    "cohorts_abandoned": self.cohorts.abandoned,
                    "cohorts_dropped": dict(self.cohorts_dropped),
                    "secagg_refused": dict(self.secagg_refused),
                }
                if self.cohorts is not None
                else {}
            ),
            **({"max_epsilon": self.ledger.max_epsilon} if self.ledger is not None else {}),
        }

    # --- internals -----------------------------------------------------------------------------
    def _carry(self, effects: list[ShardEffect], now: float) -> list[UplinkEffect]:
        """The shard's effects, for a site: acks and naks mean nothing over MQTT (the outboxes re-send)."""
        out: list[UplinkEffect] = []
        for e in effects:
            if isinstance(e, Receipt):
                out.append(DeviceReceipt(e.receipt))
            elif isinstance(e, Offer):
                p = _Pending(e.partial, due=now)
                self._pending[e.partial.pid] = p
                state = self._state() if self.ledger is not None else None  # the charge, before the sum leaves
                out += [KeepSum(e.partial.pid, e.partial.to_bytes(), state), self._send(p, now)]
            else:
                assert isinstance(e, Ack | Nak)
        return out

    def _send(self, p: _Pending, now: float) -> SendSum:
        if p.sends:
            self.resent += 1
        else:
            self.sent += 1
        p.sends += 1
        p.due = now + self.resend_after
        return SendSum(p.partial.pid, self.sum_message(p.partial, now=now).to_bytes())

    def sum_message(self, partial: Partial, *, now: float) -> UpdateMessage:
        """The weighted update that carries ``partial`` to the root."""
        mean = {
            k: (t.astype(np.float64) / partial.total).astype(t.dtype, copy=False) for k, t in partial.tensors.items()
        }
        return UpdateMessage(
            agent_id=self.site_id,
            seq=partial.pid,
            base_version=partial.version,
            num_examples=len(partial.contributions),
            delta=mean,
            sent_at=now,
            oldest_pending=min(self._pending, default=partial.pid),
            base_run=self.run,
            weight=partial.total,
            contributions=len(partial.contributions),
        )


__all__ = ["CONDEMNING", "DeviceReceipt", "KeepSum", "SendSecAgg", "SendSum", "Settle", "UplinkCore", "UplinkEffect"]
