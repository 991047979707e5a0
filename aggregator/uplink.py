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
:class:`~fedmq.secagg.server.CohortManager`), the site serves SecAgg+ cohorts to its devices
(:class:`~aggregator.site_cohorts.SiteCohorts`, shared with the NATS site) and takes no plain
update: it learns each cohort's sum and nothing of one device's update, and that sum is what it
forwards. Contributors get their receipts from the root's answer; the other members of the
cohort a :class:`~fedmq.secagg.messages.DoneMsg`. A cohort that the site abandons, or a sum the
root refuses for no device's fault, ends as ``abandoned`` for its members, who keep their
updates for a later cohort.

**Distributed DP inside the site.** With noise announced to the cohorts (calibrated for
``aggregator.secagg.dp_epsilon`` by :func:`aggregator.cohorts.with_distributed_dp`), what leaves
the site is a differentially private release: the root, and whoever reads its broker, learn a
noised sum, over its number of uploads. The devices' ledger (charged when a sum is adopted) is
written with each sum, before it is sent (:attr:`KeepSum.state`), so a restart neither forgets
nor repeats a charge.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from aggregator.privacy import FederationLedger
from aggregator.sharding import Ack, AppliedWindow, Nak, Offer, Partial, Receipt, Settled, ShardCore, ShardEffect
from aggregator.site_cohorts import CohortEffect, SendSecAgg, SiteCohorts
from fedmq.codec import DEFAULT_LIMITS, DecodeLimits, pack, unpack
from fedmq.errors import RejectReason
from fedmq.messages import ReceiptMessage, UpdateMessage
from fedmq.secagg.messages import UpMessage
from fedmq.secagg.server import CohortManager

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
        if ledger is not None and cohorts is None:
            raise ValueError("a ledger counts cohorts' sums: it needs cohorts")
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
        self.secure: SiteCohorts | None = None
        if cohorts is not None:
            self.secure = SiteCohorts(
                shard, cohorts, ledger=ledger, max_participation=max_participation, min_separation=min_separation
            )
        elif max_participation or min_separation:
            raise ValueError("participation limits need a ledger")
        self._refused_plain: Counter[str] = Counter()

    @property
    def ledger(self) -> FederationLedger | None:
        """Under distributed DP: every device's releases (the sums of its that left the site)."""
        return self.secure.ledger if self.secure is not None else None

    @property
    def secagg_refused(self) -> Counter[str]:
        """Secure-aggregation messages refused, by reason (the cohort goes on without them)."""
        return self.secure.refused if self.secure is not None else self._refused_plain

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
        if self.secure is not None:
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
        if self.secure is None:
            self._refused_plain[RejectReason.WRONG_COHORT.value] += 1
            return []
        return self._cohort_effects(self.secure.message(agent, msg, now=now, run=self.run), now)

    def offline(self, agent: str, *, now: float) -> list[UplinkEffect]:
        """A device went offline (its Will): its cohort stops waiting for it."""
        return self._cohort_effects(self.secure.offline(agent, now=now), now) if self.secure is not None else []

    def _cohort_effects(self, effects: list[CohortEffect], now: float) -> list[UplinkEffect]:
        """The cohorts' effects: a sum adopted is kept and sent (the ledger's charge with it); receipts go out."""
        out: list[UplinkEffect] = []
        for e in effects:
            out += [e] if isinstance(e, SendSecAgg) else self._carry([e], now)
        return out

    def _tell_members(
        self, seq: int, status: str, version: int, reason: str | None, *, skip: set[str]
    ) -> list[UplinkEffect]:
        """How a cohort's sum ended, to its members that no receipt tells."""
        if self.secure is None:
            return []
        return list(self.secure.settled(seq, status, version, reason, skip=skip))

    def due(self, now: float) -> list[UplinkEffect]:
        """Time passed: an open sum that waited ``partial_wait`` leaves; unanswered sums are sent again."""
        out = self._carry(self.shard.due(now), now)
        if self.secure is not None:
            out += self._cohort_effects(self.secure.tick(now, run=self.run), now)
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
            **(self.secure.stats() if self.secure is not None else {}),
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
            else:  # acks and naks mean nothing over MQTT; a settled partial was answered by the root already
                assert isinstance(e, Ack | Nak | Settled)
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
