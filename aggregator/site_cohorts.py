"""Secure aggregation inside a site: SecAgg+ cohorts whose sums become the site's partials (sans-IO).

Both kinds of site serve cohorts to their devices the same way: a site under an aggregator over
MQTT (:class:`~aggregator.uplink.UplinkCore`) and a site that is a shard of a NATS root
(:mod:`aggregator.site`). The site serves SecAgg+ cohorts (Bell et al., CCS 2020) with a
:class:`~fedmq.secagg.server.CohortManager` and learns each cohort's sum and nothing of one
device's update; :class:`SiteCohorts` turns that sum into the site's next partial
(:meth:`~aggregator.sharding.ShardCore.adopt`), which its owner sends on, and tells the members
how it ended once the owner knows.

The sum is ``sum_i w_i delta_i`` with the weights the devices applied themselves (``w_i =
s(staleness)``, clipped deltas), so the partial's total is ``sum_i w_i`` (the cohort's decoded
weight sum), taken against the site's version when the masks came off. Under distributed DP
(noise announced in ``Params.dp_stddev``; Kairouz, Liu and Steinke, ICML 2021,
arXiv:2102.06387) that weight sum is noised too, and dividing by it would scale the step by
noise: the total is then the number of uploads, DP-FedAvg's fixed denominator (McMahan et al.,
ICLR 2018), and each contributor's ledger is charged the cohort's release when the sum is
adopted. A device in ``max_participation`` sums, or whose last sum is fewer than
``min_separation`` versions old, joins no cohort: it is refused at check-in, it is taken out of
the pool a summed cohort puts its devices back into, and its masked upload is refused.

Inputs: :meth:`message` (a device's secure-aggregation message), :meth:`offline`, :meth:`tick`;
:meth:`settled` when the owner learns how a partial ended. Effects: :class:`SendSecAgg`, and the
shard's :class:`~aggregator.sharding.Receipt` and :class:`~aggregator.sharding.Offer`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Set
from dataclasses import dataclass
from typing import Any

import numpy as np

from aggregator.privacy import FederationLedger
from aggregator.sharding import STALE, Contribution, Offer, Receipt, ShardCore
from fedmq.codec import DecodeLimits
from fedmq.errors import DecodeError, RejectReason
from fedmq.messages import ReceiptMessage, StatusMessage
from fedmq.secagg.messages import CheckIn, DoneMsg, MaskedMsg, UpMessage, decode_up
from fedmq.secagg.server import Abandoned, CohortManager, Formed, Reject, SendTo, Unmasked
from fedmq.topics import Topics


@dataclass(frozen=True)
class SendSecAgg:
    """Send a device a secure-aggregation message on its ``secagg/down`` topic (the site's broker)."""

    agent: str
    payload: bytes


CohortEffect = SendSecAgg | Receipt | Offer


@dataclass(frozen=True)
class DeviceInput:
    """A device's message for the cohorts, read off the site's broker (see :func:`device_input`)."""

    agent: str
    message: UpMessage | None = None
    """Its secure-aggregation message; ``None`` with :attr:`offline` or :attr:`error`."""
    offline: bool = False
    """Its status says it is gone (its Will, or a goodbye): its cohort stops waiting for it."""
    error: DecodeError | None = None
    """An undecodable secure-aggregation message (counted and logged by the site)."""


def device_input(topics: Topics, topic: str, body: bytes, limits: DecodeLimits) -> DeviceInput | None:
    """What a message on ``topic`` means to a site's cohorts; ``None`` for a topic that is not theirs.

    A status that says the device is still there, or does not decode, means nothing
    (:class:`DeviceInput` with neither a message nor ``offline``).
    """
    agent = topics.agent_of(topic, "secagg/up")
    if agent is not None:
        try:
            return DeviceInput(agent, decode_up(body, limits))
        except DecodeError as exc:
            return DeviceInput(agent, error=exc)
    agent = topics.agent_of(topic, "status")
    if agent is None:
        return None
    try:
        online = bool(body) and StatusMessage.from_bytes(body).state in ("online", "training")
    except DecodeError:
        return DeviceInput(agent)
    return DeviceInput(agent, offline=not online)


class SiteCohorts:
    """A site's cohorts over its :class:`ShardCore` (its window, holdings, version and staleness)."""

    def __init__(
        self,
        shard: ShardCore,
        cohorts: CohortManager,
        *,
        ledger: FederationLedger | None = None,
        max_participation: int = 0,
        min_separation: int = 0,
    ) -> None:
        if (max_participation or min_separation) and ledger is None:
            raise ValueError("participation limits need a ledger")
        if max_participation < 0 or min_separation < 0:
            raise ValueError("max_participation and min_separation must be >= 0")
        self.shard = shard
        self.cohorts = cohorts
        self.ledger = ledger
        """Under distributed DP: every device's releases (the sums of its that left the site)."""
        self.max_participation = max_participation
        self.min_separation = min_separation
        self._members: dict[int, tuple[str, tuple[str, ...], frozenset[str]]] = {}
        """A cohort's partial on its way: pid -> (cohort, members, contributors), to tell the members how it ended."""
        self.refused: Counter[str] = Counter()
        """Secure-aggregation messages refused, by reason (the cohort goes on without them)."""
        self.dropped: Counter[str] = Counter()
        """Cohorts whose sum the site could not use, by reason (their members are told ``abandoned``)."""
        self.capped: set[str] = set()
        """Devices refused at check-in for ``max_participation``: they join no cohort of this site again."""

    # --- inputs ------------------------------------------------------------------------------
    def message(self, agent: str, msg: UpMessage, *, now: float, run: str | None) -> list[CohortEffect]:
        """A device's secure-aggregation message (from the topic of ``agent``)."""
        version = self.shard.version
        out: list[CohortEffect] = []
        if isinstance(msg, CheckIn):
            refusal = self._participation(agent)
            if refusal is not None:  # not in the pool: a capped device is done, a separated one checks in again
                self.refused[refusal[0].value] += 1
                if refusal[0] is RejectReason.PARTICIPATION_CAP:
                    self.capped.add(agent)
                return []
            outs = self.cohorts.check_in(agent, msg, now, version=version, run=run)
        else:
            outs = self.cohorts.receive(agent, msg, now, check=self._admit_masked)
            if isinstance(msg, MaskedMsg):
                applied = self.shard.window.get((agent, msg.seq))
                if applied is not None and applied != STALE:  # a re-send of an applied update: its receipt again
                    out.append(Receipt(ReceiptMessage(agent, msg.seq, "accepted", applied)))
        out += self._outputs(outs)
        if not isinstance(msg, CheckIn):  # a cohort may have ended: its devices are back in the pool
            out += self._outputs(self.cohorts.form(now, version=version, run=run))
        return out

    def offline(self, agent: str, *, now: float) -> list[CohortEffect]:
        """A device went offline (its Will): its cohort stops waiting for it."""
        return self._outputs(self.cohorts.offline(agent, now))

    def tick(self, now: float, *, run: str | None) -> list[CohortEffect]:
        """Time passed: round timeouts, and maybe a new cohort."""
        return self._outputs(self.cohorts.tick(now, version=self.shard.version, run=run))

    def settled(
        self, pid: int, status: str, version: int, reason: str | None, *, skip: Set[str] = frozenset()
    ) -> list[SendSecAgg]:
        """How partial ``pid`` ended (``applied`` or ``abandoned``), to its cohort's members that no receipt tells.

        Its contributors are told by their receipts when it was applied; ``skip`` names any
        other member a receipt told.
        """
        cohort = self._members.pop(pid, None)
        if cohort is None:
            return []
        name, members, contributors = cohort
        told = set(skip) | (contributors if status == "applied" else set())
        done = DoneMsg(name, status, version, reason, included=False if status == "applied" else None)  # type: ignore[arg-type]
        return [SendSecAgg(a, done.to_bytes()) for a in members if a not in told]

    def stats(self) -> dict[str, Any]:
        """Counters for the site's summary."""
        out: dict[str, Any] = {
            "cohorts_formed": self.cohorts.formed,
            "cohorts_summed": self.cohorts.applied,
            "cohorts_abandoned": self.cohorts.abandoned,
            "cohorts_dropped": dict(self.dropped),
            "secagg_refused": dict(self.refused),
        }
        if self.ledger is not None:
            out["max_epsilon"] = self.ledger.max_epsilon
        return out

    # --- internals -----------------------------------------------------------------------------
    def _participation(self, agent: str) -> tuple[RejectReason, str] | None:
        """Why ``agent`` may not join another cohort now, if so: its ledger decides, as for the aggregator."""
        if self.ledger is None:
            return None
        return self.ledger.refusal(
            agent,
            version=self.shard.version,
            max_participation=self.max_participation,
            min_separation=self.min_separation,
        )

    def _admit_masked(self, agent: str, msg: MaskedMsg) -> Reject | None:
        key = (agent, msg.seq)
        if msg.agent_id != agent:
            return Reject(agent, RejectReason.AGENT_ID_MISMATCH, f"the upload names {msg.agent_id!r}")
        if self.shard.window.get(key) is not None:
            return Reject(agent, RejectReason.DUPLICATE, f"seq {msg.seq} was settled before")
        if self.shard.holds(key):
            return Reject(agent, RejectReason.DUPLICATE, f"seq {msg.seq} is in a sum on its way to the root")
        refusal = self._participation(agent)  # checked at check-in too; this holds whatever put it in a cohort
        if refusal is not None:
            return Reject(agent, refusal[0], f"{agent!r} {refusal[1]}")
        version = self.shard.version
        if msg.base_version > version:
            return Reject(agent, RejectReason.UNKNOWN_BASE_VERSION, f"base version {msg.base_version} > {version}")
        if version - msg.base_version > self.shard.max_staleness:
            why = f"staleness {version - msg.base_version} > max {self.shard.max_staleness}"
            return Reject(agent, RejectReason.TOO_STALE, why)
        return None

    def _outputs(self, outs: list[Any]) -> list[CohortEffect]:
        out: list[CohortEffect] = []
        for o in outs:
            if isinstance(o, SendTo):
                out.append(SendSecAgg(o.agent, o.message.to_bytes()))
            elif isinstance(o, Reject):
                self.refused[o.reason.value] += 1
            elif isinstance(o, Unmasked):
                out += self._adopt(o)
            else:  # a cohort formed, or abandoned (its members told by the manager)
                assert isinstance(o, Formed | Abandoned)
        return out

    def _adopt(self, u: Unmasked) -> list[CohortEffect]:
        """A cohort's sum becomes the site's next partial (the owner sends it on)."""
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
            self.dropped[why] += 1
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
                if self._participation(c.agent) is not None:
                    self.cohorts.leave(c.agent)
        offer = self.shard.adopt(version, contributions, total, tensors)
        self._members[offer.partial.pid] = (u.cohort, u.members, frozenset(c.agent for c in u.contributors))
        return [offer]


__all__ = ["CohortEffect", "DeviceInput", "SendSecAgg", "SiteCohorts", "device_input"]
