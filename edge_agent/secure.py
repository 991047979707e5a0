"""The agent's part in secure aggregation, without I/O: one cohort session at a time.

When the aggregator's model message announces secure aggregation, the agent no longer
publishes its updates. It keeps them in its outbox, as before, checks in, and when a cohort
forms, runs the device side of the protocol (:class:`fedmq.secagg.client.ClientSession`):
its oldest update not yet in a cohort becomes its input, weighted by its own staleness
(``s(current - base)``, the function the aggregator announced), clipped, quantized and masked.
The outbox entry stays until the aggregator's receipt says the cohort's sum was applied; if
the cohort is abandoned or the device refuses it, the entry is free for the next cohort
(with fresh keys and masks).

Once its masked upload has left, a device cannot tell from its own side whether the sum took
it: the aggregator may apply the cohort and put the device straight into the next one, and
that announcement can arrive before the receipt (it travels on another topic, and a receipt
leaves only once its group is on disk). So an upload whose cohort ended without word of its
fate (a new cohort, a deadline) stays *in doubt*: kept, and not offered to another cohort,
until the receipt, the old cohort's ``DoneMsg``, or ``doubt_timeout`` seconds settle it. After
the timeout it is free again, which is safe: an update already summed is answered as a
duplicate with its receipt, never summed twice. A repeated cohort announcement is ignored.

Signing uses the device's TLS client key; roster signatures are checked against the
federation CA whenever the device has both (the mutual-TLS deployment).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Collection
from typing import Any

import numpy as np

from edge_agent.outbox import Outbox
from edge_agent.pipeline import BudgetExhausted
from edge_agent.service import SecureStats
from fedmq.codec import DecodeLimits
from fedmq.errors import DecodeError
from fedmq.messages import ModelMessage, UpdateMessage
from fedmq.secagg.client import (
    ClientSession,
    Finished,
    Ignored,
    NeedInput,
    Output,
    Refused,
    Send,
    weighted_input,
)
from fedmq.secagg.crypto import Signer, Verifier
from fedmq.secagg.ddp import DdgParams
from fedmq.secagg.messages import CheckIn, CohortMsg, DoneMsg, UpMessage, decode_down
from fedmq.staleness import make_staleness_fn

log = logging.getLogger("fedmq.agent")

ANNOUNCEMENTS_KEPT = 64
"""Cohort announcements remembered, to ignore a repeat (a device joins one cohort at a time)."""


class SecureUploads:
    """The cohort session of one agent and which outbox entry is in it.

    Args:
        agent_id: this device.
        outbox: the agent's outbox (entries are plain encoded updates).
        limits: decoder limits for the aggregator's messages.
        signer: the TLS identity that signs this device's keys (``None``: unsigned).
        verifier: the federation CA that roster signatures must verify against.
        stats: where to count what happens (the agent's :class:`~edge_agent.service.SecureStats`).
        checkin_interval: seconds between check-ins while in no cohort (``agent.checkin_interval``).
        charge: charges a distributed-DP release to the device's ledger before the masked upload
            leaves, and returns the epsilon after it; raises
            :class:`~edge_agent.pipeline.BudgetExhausted` past the budget (nothing is uploaded).
        require_dp: upload only into cohorts that announce distributed DP (``privacy.require_distributed``).
        doubt_timeout: seconds an upload stays in doubt before it is offered again
            (``agent.receipt_timeout``, the wait before a plain update is re-sent).
    """

    def __init__(
        self,
        agent_id: str,
        outbox: Outbox,
        limits: DecodeLimits,
        *,
        signer: Signer | None,
        verifier: Verifier | None,
        stats: SecureStats | None = None,
        checkin_interval: float = 2.0,
        charge: Callable[[DdgParams], float] | None = None,
        require_dp: bool = False,
        doubt_timeout: float = 30.0,
    ) -> None:
        if doubt_timeout <= 0:
            raise ValueError(f"doubt_timeout must be > 0, got {doubt_timeout}")
        self.agent_id = agent_id
        self.outbox = outbox
        self.limits = limits
        self.signer, self.verifier = signer, verifier
        self.session: ClientSession | None = None
        self.assigned: dict[int, str] = {}
        """Outbox seq -> the cohort its masked upload went to (until the cohort ends)."""
        self.stats = stats if stats is not None else SecureStats()
        self.next_checkin = 0.0
        self.checkin_interval = checkin_interval
        self.charge = charge
        self.require_dp = require_dp
        self.doubt_timeout = doubt_timeout
        self._announced: OrderedDict[str, None] = OrderedDict()
        """The cohorts announced to this device lately, oldest first: a second announcement is a repeat."""
        self.in_doubt: dict[str, float] = {}
        """Ended cohorts that hold an upload of this device whose fate is not known yet, and since when."""

    # --- inputs ----------------------------------------------------------------------------
    def check_in(self, now: float, model: ModelMessage) -> CheckIn | None:
        """A check-in, if the agent is in no cohort and the last one is ``checkin_interval`` seconds old."""
        self._expire_doubt(now)
        if self.session is not None and not self.session.expired(now):
            return None
        if self.session is not None:
            self._end("the cohort timed out on this device", now)
        if now < self.next_checkin:
            return None
        self.next_checkin = now + self.checkin_interval
        return CheckIn(self.agent_id, model.run)

    def on_message(self, payload: bytes, now: float) -> list[Output]:
        """A message from the aggregator on this device's ``secagg/down`` topic."""
        try:
            msg = decode_down(payload, self.limits)
        except DecodeError as exc:
            self.stats.ignored[exc.reason.value] += 1
            log.warning("agent %s: ignoring a bad secure-aggregation message: %s", self.agent_id, exc)
            return []
        if isinstance(msg, CohortMsg):
            if msg.cohort in self._announced:  # a repeat (QoS 1 delivers at least once, and a check-in
                self.stats.ignored["repeated_announcement"] += 1  # that crossed it is answered with it)
                return []
            self._announced[msg.cohort] = None
            while len(self._announced) > ANNOUNCEMENTS_KEPT:
                self._announced.popitem(last=False)
            if self.session is not None and not self.session.expired(now):
                self._end("the aggregator formed a new cohort for this device", now)
            self.session = ClientSession(self.agent_id, msg, now=now, signer=self.signer, verifier=self.verifier)
            self.stats.cohorts_joined += 1
            return self._settle(self.session.start(), now)
        if self.session is None or msg.cohort != self.session.cohort:
            if isinstance(msg, DoneMsg) and msg.cohort in self.in_doubt:  # word of an upload in doubt
                del self.in_doubt[msg.cohort]
                included = msg.status == "applied" and msg.included is True
                self._release(msg.cohort, applied=included)
                return []
            self.stats.ignored["wrong_cohort"] += 1
            return []
        return self._settle(self.session.handle(msg), now)

    def input_for(self, model: ModelMessage, *, skip: Collection[int] = ()) -> tuple[np.ndarray, UpdateMessage] | None:
        """The oldest outbox update not in a cohort, weighted for ``model``'s version; None if there is none.

        An update too stale for the announced ``max_staleness`` is dropped (a cohort would refuse
        it); one trained on another run was already dropped when the run changed.
        """
        params = model.secagg
        assert params is not None
        weight_of = make_staleness_fn(params.staleness, params.staleness_a, params.staleness_b)
        for seq, payload in self.outbox.pending():
            if seq in self.assigned or seq in skip:
                continue
            try:
                update = UpdateMessage.from_bytes(payload, self.limits)
            except DecodeError:
                continue
            staleness = max(0, model.version - update.base_version)
            if staleness > params.max_staleness:
                self.outbox.remove(seq)
                self.stats.dropped_stale += 1
                log.info("agent %s: update %d is %d versions stale: dropped", self.agent_id, seq, staleness)
                continue
            try:
                values = weighted_input(update.delta, clip_norm=params.clip_norm, weight=weight_of(staleness))
            except ValueError as exc:  # our own update is not finite: the trainer's guard failed
                self.outbox.remove(seq)
                log.warning("agent %s: update %d cannot be masked (%s): dropped", self.agent_id, seq, exc)
                continue
            return values, update
        return None

    def provide(self, values: np.ndarray, update: UpdateMessage, now: float) -> list[Output]:
        """Mask ``values`` (the update's weighted input) in the current session (blocking: a thread may run it)."""
        session = self.session
        if session is None or not session.waiting_for_input:
            return []
        epsilon = update.epsilon
        release = session.release_for(values.size)
        if release is None and self.require_dp:
            self.stats.refused["no_distributed_dp"] += 1
            self._end("the cohort adds no distributed DP noise, and privacy.require_distributed is set", now)
            return []
        if release is not None and self.charge is not None:
            try:
                epsilon = self.charge(release)
            except BudgetExhausted as exc:
                self._end(str(exc), now)
                raise
        outs = session.provide_input(values, seq=update.seq, base_version=update.base_version, epsilon=epsilon)
        if session.input_seq is not None:
            self.assigned[update.seq] = session.cohort
            self.stats.masked_uploads += 1
        return self._settle(outs, now)

    def settled(self, seq: int, now: float, *, accepted: bool = True) -> None:
        """The receipt for ``seq`` arrived: it left the outbox; if the current cohort summed it, that cohort is done.

        The aggregator answers a summed upload with its receipt only (no DoneMsg): the device is
        back in the aggregator's pool and checks in again only after ``checkin_interval``.
        """
        cohort = self.assigned.pop(seq, None)
        if cohort is not None and cohort in self.in_doubt and cohort not in self.assigned.values():
            del self.in_doubt[cohort]
            if accepted:
                self.stats.summed += 1
        session = self.session
        if accepted and session is not None and cohort == session.cohort and session.input_seq == seq:
            self.stats.cohorts_applied += 1
            self.stats.summed += 1
            self.session = None
            self.next_checkin = now + self.checkin_interval

    @property
    def waiting_for_input(self) -> bool:
        """A session has its masks ready and waits for an update."""
        return self.session is not None and self.session.waiting_for_input

    def needs_update(self) -> bool:
        """Whether training should produce an update: none in the outbox is free for a cohort."""
        return all(seq in self.assigned for seq, _ in self.outbox.pending())

    # --- results -------------------------------------------------------------------------------
    def _settle(self, outs: list[Output], now: float) -> list[Output]:
        for o in outs:
            if isinstance(o, Finished):
                if o.status == "applied":
                    self.stats.cohorts_applied += 1
                else:
                    self.stats.cohorts_abandoned += 1
                    log.info("agent %s: cohort %s abandoned: %s", self.agent_id, o.cohort[:8], o.reason)
                self._release(o.cohort, applied=o.included)
                self.session = None
                # A device whose upload was summed is back in the aggregator's pool; the others check in.
                self.next_checkin = now + self.checkin_interval if o.included else 0.0
            elif isinstance(o, Refused):
                self.stats.refused[o.reason] += 1
                log.warning("agent %s: left cohort %s: %s (%s)", self.agent_id, o.cohort[:8], o.reason, o.detail)
                self._release(o.cohort, applied=False)
                self.session = None
                self.next_checkin = 0.0
            elif isinstance(o, Ignored):
                self.stats.ignored[o.reason] += 1
        return outs

    def _end(self, why: str, now: float) -> None:
        """Leave the session without word of its end: an upload that left is in doubt, the rest is free."""
        session = self.session
        assert session is not None
        self.session = None
        uploaded = session.input_seq
        if uploaded is not None and self.assigned.get(uploaded) == session.cohort:
            self.in_doubt[session.cohort] = now
            self.stats.in_doubt += 1
            log.info(
                "agent %s: leaving cohort %s (%s); update %d stays until its receipt says whether the sum took it",
                self.agent_id, session.cohort[:8], why, uploaded,
            )  # fmt: skip
            return
        log.info("agent %s: leaving cohort %s: %s", self.agent_id, session.cohort[:8], why)
        self._release(session.cohort, applied=False)

    def _expire_doubt(self, now: float) -> None:
        """Uploads in doubt for ``doubt_timeout``: free for another cohort (the aggregator refuses a repeat)."""
        for cohort, since in list(self.in_doubt.items()):
            if now - since >= self.doubt_timeout:
                del self.in_doubt[cohort]
                log.info("agent %s: no word of cohort %s: its update is free again", self.agent_id, cohort[:8])
                self._release(cohort, applied=False)

    def _release(self, cohort: str, *, applied: bool) -> None:
        """The cohort is over: its update is settled if the sum included it, else free for the next cohort."""
        for seq in [q for q, c in self.assigned.items() if c == cohort]:
            del self.assigned[seq]
            if applied and seq in self.outbox:  # durable at the aggregator, as its receipt (maybe later) says too
                self.outbox.remove(seq)
                self.stats.summed += 1


def messages(outs: list[Output]) -> list[UpMessage]:
    """What to publish."""
    return [o.message for o in outs if isinstance(o, Send)]


def wants_input(outs: list[Output]) -> bool:
    """Whether the session asked for the update."""
    return any(isinstance(o, NeedInput) for o in outs)


def signing_identity(
    cert_file: str | None, key_file: str | None, ca_file: str | None
) -> tuple[Signer | None, Verifier | None]:
    """The signer and verifier of the mutual-TLS deployment (both or neither); ValueError if they do not load."""
    if not (cert_file and key_file):
        return None, None
    signer = Signer.from_files(cert_file, key_file)
    verifier = Verifier.from_file(ca_file) if ca_file else None
    return signer, verifier


__all__: list[Any] = ["SecureUploads", "messages", "signing_identity", "wants_input"]
