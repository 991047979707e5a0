"""The aggregator side of secure aggregation: cohorts as state machines, no I/O.

:class:`CohortManager` forms cohorts from the devices that checked in (one FedBuff buffer
each, ``K (1 + rho)`` devices, several at once, a device in at most one) and routes each
device's message to its cohort. A :class:`CohortServer` runs one cohort through the rounds
of SecAgg+ (Bell et al., CCS 2020; Bonawitz et al., CCS 2017), one state class per round as
in Google fcp's ``secagg_server_r*_state``::

    CollectingKeys    -> RosterMsg to each device: its neighbours' signed keys
    CollectingShares  -> RelayMsg to each device: the shares its neighbours encrypted for it
    CollectingInputs  -> at K masked uploads (or the timeout): UnmaskMsg to every uploader
    CollectingReveals -> reconstruct, remove the masks, dequantize: Unmasked(sum, weight)
    Finished | Abandoned

A round ends when every device still expected has answered, or at its timeout; a device the
service reports offline is not waited for. Between rounds the cohort drops devices whose
secrets could no longer be reconstructed (fewer than ``t`` holders left), before anyone masks
with them. It is abandoned, and nothing is applied, when fewer than ``t`` devices upload or any
needed secret has fewer than ``t`` valid shares. Every message that breaks the protocol is
refused with a :class:`~fedmq.errors.RejectReason` and counted; the cohort goes on without it.

The inputs carry ``now``; the outputs are values (:class:`SendTo`, :class:`Reject`,
:class:`Formed`, :class:`Unmasked`, :class:`Abandoned`) for the caller to carry out.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedmq.errors import RejectReason
from fedmq.secagg import crypto, ddg_noise, ddp, shamir
from fedmq.secagg.client import PAIR_DOMAIN, SELF_DOMAIN
from fedmq.secagg.graph import Graph, auto_degree, build_graph, threshold_for
from fedmq.secagg.messages import (
    CheckIn,
    CohortMsg,
    DoneMsg,
    DownMessage,
    KeysMsg,
    MaskedMsg,
    Params,
    RelayMsg,
    RevealMsg,
    RosterMsg,
    SharesMsg,
    UnmaskMsg,
    UpMessage,
)
from fedmq.secagg.quantize import U64, dequantize, reduce, ring_dtype, scale_for, wire_dtype


# --- outputs -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SendTo:
    """Publish ``message`` on ``agent``'s ``secagg/down`` topic."""

    agent: str
    message: DownMessage


@dataclass(frozen=True)
class Reject:
    """A device's message broke the protocol (counted; the cohort goes on without it)."""

    agent: str
    reason: RejectReason
    detail: str


@dataclass(frozen=True)
class Formed:
    """A cohort began (log it: after a crash its devices must be told it is over)."""

    cohort: str
    members: tuple[str, ...]


@dataclass(frozen=True)
class Contribution:
    """One masked upload that went into a sum."""

    agent: str
    seq: int
    base_version: int
    epsilon: float | None


@dataclass(frozen=True)
class Unmasked:
    """A cohort's sum: ``values[:-1]`` is ``sum w_i delta_i`` (flattened), ``values[-1]`` is ``sum w_i``.

    Under distributed DP (``release`` set) both carry the devices' noise, and ``values[-1]`` is the
    weights' sum scaled by ``0.1 C`` (:func:`fedmq.secagg.ddg_noise.weight_sum` reads it back).
    """

    cohort: str
    values: np.ndarray
    contributors: tuple[Contribution, ...]
    members: tuple[str, ...]
    bad_holders: tuple[str, ...] = ()
    release: ddp.DdgParams | None = None
    """Under distributed DP, the release this sum is for each contributor (their ledgers charge it)."""


@dataclass(frozen=True)
class Abandoned:
    """A cohort ended without a sum (``reason``); nothing of it is applied."""

    cohort: str
    reason: str
    members: tuple[str, ...]


Out = SendTo | Reject | Formed | Unmasked | Abandoned
Check = Callable[[str, MaskedMsg], Reject | None]
"""The aggregator's own admission of a masked upload (run, staleness, duplicates)."""


class _Drop(Exception):
    """Internal: abandon the cohort with this reason."""


# --- one cohort ------------------------------------------------------------------------------------
class CohortServer:
    """One cohort, from its announcement to its sum.

    Args:
        announce: the cohort message sent to every member.
        target: close the upload round at this many masked uploads.
        n_values: the length of a device's input (model parameters + 1 for the weight).
        now: when it began.
        verifier: the federation CA (``None``: keys are not checked here; devices check them).
    """

    def __init__(
        self, announce: CohortMsg, *, target: int, n_values: int, now: float, verifier: crypto.Verifier | None = None
    ) -> None:
        self.announce = announce
        self.id = announce.cohort
        self.members = announce.members
        self.graph: Graph = build_graph(self.id, self.members, announce.degree)
        self.t = announce.threshold
        self.params: Params = announce.params
        self.target = target
        self.n_values = n_values
        self.verifier = verifier
        self.release = self.params.release(threshold=self.t, members=len(self.members), dim=n_values)
        """Under distributed DP, the release every sum of this cohort is (what the ledgers charge)."""
        if self.release is not None:
            self.scale = 1.0 / self.release.gamma
        else:
            self.scale = scale_for(self.params.bits, self.params.clip_range, len(self.members))
        self.min_uploads = max(self.t, self.params.dp_survivors if self.params.distributed_dp else 0)
        """The fewest uploads a sum may hold: the threshold, and the noise's calibration under distributed DP."""
        self.width = wire_dtype(self.params.bits)
        self.state: _Round = CollectingKeys()
        self.deadline = now + announce.timeout
        self.gone: set[str] = set()
        self.keys: dict[str, KeysMsg] = {}
        self.alive: set[str] = set(self.members)
        """Devices the cohort still counts on (shrinks as devices drop or are excluded)."""
        self.shares: dict[str, SharesMsg] = {}
        self.inputs: dict[str, tuple[MaskedMsg, U64]] = {}
        self.dropped: frozenset[str] = frozenset()
        self.reveals: dict[str, RevealMsg] = {}
        self.digests: set[bytes] = set()

    @property
    def finished(self) -> bool:
        """Whether the cohort ended (summed or abandoned)."""
        return isinstance(self.state, (Finished, AbandonedState))

    @property
    def phase(self) -> str:
        """The round it is in."""
        return self.state.name

    def receive(self, agent: str, msg: UpMessage, now: float, check: Check | None = None) -> list[Out]:
        """One message from ``agent`` (a member, for this cohort)."""
        if agent not in self.members:
            return [Reject(agent, RejectReason.NOT_MEMBER, f"{agent!r} is not in cohort {self.id[:8]}")]
        return self._run(lambda: self.state.receive(self, agent, msg, now, check), now)

    def offline(self, agent: str, now: float) -> list[Out]:
        """``agent`` went away: the rounds stop waiting for it."""
        self.gone.add(agent)
        return self._run(lambda: (self.state, []), now)

    def tick(self, now: float) -> list[Out]:
        """Time passed: a round past its deadline ends with what it has."""
        if self.finished or now < self.deadline:
            return []
        return self._advance(now, [])

    def _run(self, step: Callable[[], tuple[_Round, list[Out]]], now: float) -> list[Out]:
        if self.finished:
            return []
        state, out = step()
        self.state = state
        if not self.finished and self.state.complete(self):
            return self._advance(now, out)
        return out

    def _advance(self, now: float, out: list[Out]) -> list[Out]:
        try:
            self.state, more = self.state.close(self)
        except _Drop as exc:
            self.state = AbandonedState()
            return [*out, Abandoned(self.id, str(exc), self.members)]
        self.deadline = now + self.announce.timeout
        return [*out, *more]

    # --- helpers ---------------------------------------------------------------------------------
    def waiting(self, answered: Collection[str]) -> set[str]:
        """Who the current round still waits for."""
        return self.alive - set(answered) - self.gone

    def prune(self, pool: set[str]) -> set[str]:
        """The largest subset of ``pool`` whose members each keep ``t`` holders inside it."""
        keep = set(pool)
        while True:
            weak = {a for a in keep if len(self.graph.holders(a) & keep) < self.t}
            if not weak:
                return keep
            keep -= weak

    def mask_width(self) -> int:
        """Bytes of one masked upload."""
        return self.n_values * self.width.itemsize


class _Round:
    name = "round"

    def receive(
        self, c: CohortServer, agent: str, msg: UpMessage, now: float, check: Check | None
    ) -> tuple[_Round, list[Out]]:
        return self, [Reject(agent, RejectReason.WRONG_PHASE, f"{msg.kind} while the cohort is {self.name}")]

    def complete(self, c: CohortServer) -> bool:
        return False

    def close(self, c: CohortServer) -> tuple[_Round, list[Out]]:
        raise NotImplementedError


def _dup(agent: str, what: str) -> list[Out]:
    return [Reject(agent, RejectReason.DUPLICATE, f"a second {what} from {agent!r}")]


class CollectingKeys(_Round):
    """Round 0: collecting each device's signed public keys."""

    name = "collecting_keys"

    def receive(
        self, c: CohortServer, agent: str, msg: UpMessage, now: float, check: Check | None
    ) -> tuple[_Round, list[Out]]:
        """Take one device message in this round."""
        if not isinstance(msg, KeysMsg):
            return super().receive(c, agent, msg, now, check)
        if agent in c.keys:
            return self, _dup(agent, "key advertisement")
        if msg.agent_id != agent:
            return self, [Reject(agent, RejectReason.AGENT_ID_MISMATCH, f"keys name {msg.agent_id!r}")]
        if c.verifier is not None:
            payload = crypto.advert_payload(c.id, agent, msg.mask_pk, msg.share_pk)
            try:
                c.verifier.verify(agent, payload, msg.cert, msg.sig)
            except crypto.CryptoError as exc:
                return self, [Reject(agent, RejectReason.BAD_SIGNATURE, exc.detail)]
        c.keys[agent] = msg
        return self, []

    def complete(self, c: CohortServer) -> bool:
        """Whether the round has everything it waits for."""
        return not c.waiting(c.keys)

    def close(self, c: CohortServer) -> tuple[_Round, list[Out]]:
        """End the round: the next state and what to send."""
        c.alive = c.prune(set(c.keys) - c.gone)
        if len(c.alive) < c.t:
            raise _Drop(f"keys from {len(c.alive)} devices with enough neighbours, the threshold is {c.t}")
        out: list[Out] = []
        for a in sorted(c.alive):
            nbrs = sorted(c.graph.neighbours[a] & c.alive)
            out.append(SendTo(a, RosterMsg(c.id, tuple(c.keys[v] for v in nbrs))))
        for a in sorted(set(c.members) - c.alive):
            out.append(SendTo(a, DoneMsg(c.id, "abandoned", c.announce.version, "left out of the cohort")))
        return CollectingShares(), out


class CollectingShares(_Round):
    """Round 1: collecting each device's encrypted shares for its neighbours."""

    name = "collecting_shares"

    def receive(
        self, c: CohortServer, agent: str, msg: UpMessage, now: float, check: Check | None
    ) -> tuple[_Round, list[Out]]:
        """Take one device message in this round."""
        if not isinstance(msg, SharesMsg):
            return super().receive(c, agent, msg, now, check)
        if agent in c.shares:
            return self, _dup(agent, "share message")
        if agent not in c.alive:
            return self, [Reject(agent, RejectReason.WRONG_PHASE, f"{agent!r} is no longer in the cohort")]
        expected = c.graph.neighbours[agent] & c.alive
        extra = set(msg.shares) - expected
        if extra:
            return self, [Reject(agent, RejectReason.NOT_NEIGHBOUR, f"shares for {sorted(extra)[:4]}, no neighbours")]
        if set(msg.shares) != expected:
            missing = sorted(expected - set(msg.shares))[:4]
            return self, [Reject(agent, RejectReason.BAD_SHARE, f"no shares for neighbours {missing}")]
        c.shares[agent] = msg
        return self, []

    def complete(self, c: CohortServer) -> bool:
        """Whether the round has everything it waits for."""
        return not c.waiting(c.shares)

    def close(self, c: CohortServer) -> tuple[_Round, list[Out]]:
        """End the round: the next state and what to send."""
        before = c.alive
        c.alive = c.prune(set(c.shares) - c.gone)
        if len(c.alive) < c.t:
            raise _Drop(f"shares from {len(c.alive)} devices with enough holders, the threshold is {c.t}")
        out: list[Out] = []
        for a in sorted(c.alive):
            senders = c.graph.neighbours[a] & c.alive
            out.append(SendTo(a, RelayMsg(c.id, {v: c.shares[v].shares[a] for v in sorted(senders)})))
        for a in sorted(before - c.alive):
            out.append(SendTo(a, DoneMsg(c.id, "abandoned", c.announce.version, "left out of the cohort")))
        return CollectingInputs(), out


class CollectingInputs(_Round):
    """Round 2: collecting masked uploads until ``K`` arrived or the timeout."""

    name = "collecting_inputs"

    def receive(
        self, c: CohortServer, agent: str, msg: UpMessage, now: float, check: Check | None
    ) -> tuple[_Round, list[Out]]:
        """Take one device message in this round."""
        if not isinstance(msg, MaskedMsg):
            return super().receive(c, agent, msg, now, check)
        if agent not in c.alive:
            return self, [Reject(agent, RejectReason.WRONG_PHASE, f"{agent!r} is no longer in the cohort")]
        digest = hashlib.sha256(msg.data).digest()
        if agent in c.inputs:
            if digest in c.digests:
                return self, _dup(agent, "masked upload")
            return self, [Reject(agent, RejectReason.SECOND_UPLOAD, f"{agent!r} uploaded a different vector before")]
        if len(msg.data) != c.mask_width():
            what = f"{len(msg.data)} bytes, a masked upload of this model is {c.mask_width()}"
            return self, [Reject(agent, RejectReason.MODEL_MISMATCH, what)]
        if check is not None and (refused := check(agent, msg)) is not None:
            return self, [refused]
        values = np.frombuffer(msg.data, dtype=c.width)  # a read-only view: only ever summed
        c.inputs[agent] = (msg, values)
        c.digests.add(digest)
        return self, []

    def complete(self, c: CohortServer) -> bool:
        """At ``K`` uploads once every secret has ``t`` holders among the uploaders, or when nobody is left."""
        if not c.waiting(c.inputs):
            return True
        uploaded = set(c.inputs)
        return len(uploaded) >= c.target and all(len(c.graph.holders(a) & uploaded) >= c.t for a in c.alive)

    def close(self, c: CohortServer) -> tuple[_Round, list[Out]]:
        """End the round: the next state and what to send."""
        uploaded = set(c.inputs)
        if len(uploaded) < c.min_uploads:
            raise _Drop(f"{len(uploaded)} masked uploads, a sum needs {c.min_uploads} (threshold {c.t})")
        weak = [a for a in c.alive if len(c.graph.holders(a) & uploaded) < c.t]
        if weak:
            raise _Drop(f"the secrets of {sorted(weak)[:4]} have fewer than {c.t} holders among the uploaders")
        c.dropped = frozenset(c.alive - uploaded)
        survivors, dropped = tuple(sorted(uploaded)), tuple(sorted(c.dropped))
        out: list[Out] = [SendTo(a, UnmaskMsg(c.id, survivors, dropped)) for a in survivors]
        return CollectingReveals(), out


class CollectingReveals(_Round):
    """Round 3: collecting the uploaders' shares; then remove the masks."""

    name = "collecting_reveals"

    def receive(
        self, c: CohortServer, agent: str, msg: UpMessage, now: float, check: Check | None
    ) -> tuple[_Round, list[Out]]:
        """Take one device message in this round."""
        if isinstance(msg, MaskedMsg) and agent in c.alive:
            return self, [Reject(agent, RejectReason.LATE_UPLOAD, "a masked upload after the upload round closed")]
        if not isinstance(msg, RevealMsg):
            return super().receive(c, agent, msg, now, check)
        if agent not in c.inputs:
            return self, [Reject(agent, RejectReason.WRONG_PHASE, f"{agent!r} did not upload: it is not asked")]
        if agent in c.reveals:
            return self, _dup(agent, "reveal")
        holders_of = c.graph.holders
        bad_seeds = {v for v in msg.seeds if v not in c.inputs or agent not in holders_of(v)}
        bad_keys = {v for v in msg.keys if v not in c.dropped or agent not in holders_of(v) or v == agent}
        out: list[Out] = []
        if bad_seeds or bad_keys:  # refused and counted; the shares it was asked for still count
            names = sorted(bad_seeds | bad_keys)[:4]
            out.append(Reject(agent, RejectReason.NOT_NEIGHBOUR, f"reveals for {names}, not asked of it"))
            seeds = {v: b for v, b in msg.seeds.items() if v not in bad_seeds}
            keys = {v: b for v, b in msg.keys.items() if v not in bad_keys}
            msg = RevealMsg(msg.cohort, msg.agent_id, seeds, keys)
        c.reveals[agent] = msg
        return self, out

    def complete(self, c: CohortServer) -> bool:
        """Whether the round has everything it waits for."""
        return not (set(c.inputs) - set(c.reveals) - c.gone)

    def close(self, c: CohortServer) -> tuple[_Round, list[Out]]:
        """End the round: the next state and what to send."""
        total, bad = unmask(c)
        values = dequantize(total, scale=c.scale, bits=c.params.bits)
        weight = float(values[-1])
        n = len(c.inputs)
        slack = 0.0
        if c.release is not None:  # the weights' sum is scaled and noised: allow 8 of its standard deviations
            weight = ddg_noise.weight_sum(values, c.params.clip_norm)
            slack = 8 * math.sqrt(n) * c.release.local_stddev / ddp.weight_scale(c.params.clip_norm)
        if not (-slack < weight <= n * (1 + 1e-6) + n / c.scale + slack):
            raise _Drop(f"the weights sum to {weight:.4g}, impossible for {n} uploads (a device sent garbage)")
        contributors = tuple(
            Contribution(a, m.seq, m.base_version, m.epsilon) for a, (m, _) in sorted(c.inputs.items())
        )
        rejects: list[Out] = [
            Reject(h, RejectReason.BAD_SHARE, "a revealed share is not on its polynomial") for h in bad
        ]
        return Finished(), [*rejects, Unmasked(c.id, values, contributors, c.members, tuple(bad), c.release)]


class Finished(_Round):
    """The sum is out."""

    name = "finished"


class AbandonedState(_Round):
    """Nothing is applied."""

    name = "abandoned"


def unmask(c: CohortServer) -> tuple[U64, list[str]]:
    """Reconstruct the needed secrets and remove every mask: the sum of the quantized inputs mod ``2^bits``.

    Raises:
        _Drop: a secret with fewer than ``t`` valid shares.
    """
    bits, n = c.params.bits, c.n_values
    total = np.zeros(n, dtype=ring_dtype(bits))
    for _, values in c.inputs.values():
        total += values
    bad: set[str] = set()
    for v in sorted(c.inputs):  # the self masks of the uploaders
        seed, wrong = _reconstruct(c, v, "seeds", _seed_check(c, v))
        bad |= wrong
        total -= crypto.expand_mask(seed, n, bits, domain=SELF_DOMAIN)
    for v in sorted(c.dropped):  # the pairwise masks the uploaders added for devices that dropped
        raw, wrong = _reconstruct(c, v, "keys", _key_check(c.keys[v].mask_pk))
        bad |= wrong
        key = crypto.key_from_private(raw)
        for w in sorted(c.graph.neighbours[v] & set(c.inputs)):
            s = crypto.agree(key, c.keys[w].mask_pk, purpose=crypto.MASK_PURPOSE, cohort=c.id, me=v, peer=w)
            mask = crypto.expand_mask(s, n, bits, domain=PAIR_DOMAIN)
            total -= mask if w < v else (mask.dtype.type(0) - mask)  # what w added for v
    return reduce(total, bits), sorted(bad)


def _seed_check(c: CohortServer, owner: str) -> Callable[[bytes], bool]:
    commit = c.shares[owner].commit
    return lambda seed: crypto.seed_commitment(seed, c.id, owner) == commit


def _key_check(public: bytes) -> Callable[[bytes], bool]:
    return lambda raw: _public_of(raw) == public


def _public_of(raw: bytes) -> bytes | None:
    try:
        return crypto.public_bytes(crypto.key_from_private(raw))
    except ValueError:
        return None


def _reconstruct(c: CohortServer, owner: str, which: str, check: Callable[[bytes], bool]) -> tuple[bytes, set[str]]:
    shares: dict[int, int] = {}
    for holder, reveal in c.reveals.items():
        blob = getattr(reveal, which).get(owner)
        if blob is not None:
            shares[c.graph.index(holder)] = shamir.share_from_bytes(blob)
    try:
        secret, wrong = shamir.combine_checked(shares, c.t, check)
    except shamir.ShareError as exc:
        raise _Drop(f"the {which[:-1]} of {owner!r} cannot be reconstructed: {exc}") from None
    return secret, {c.members[x - 1] for x in wrong}


# --- cohorts ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SecAggSettings:
    """How cohorts are formed (``aggregator.secagg`` in the config)."""

    cohort_size: int = 10
    """K: masked uploads that close a cohort (one FedBuff buffer)."""
    overselect: float = 0.2
    """rho: a cohort has ``ceil(K (1 + rho))`` devices, so that it completes despite dropouts."""
    threshold: float = 0.6
    """t as a fraction of a device's holders (neighbours and itself), more than one half."""
    degree: int = 0
    """Neighbours per device (0: all up to 32 devices, else about 3 log2 n)."""
    min_cohort: int = 3
    """Fewest devices that form a cohort, after ``form_wait`` seconds of waiting for more."""
    form_wait: float = 2.0
    """Seconds the oldest device in the pool waits for a full cohort before a smaller one forms
    (from everyone waiting, at least ``min_cohort``): with few devices, cohorts then overlap."""
    timeout: float = 10.0
    """Seconds each round waits at most."""
    max_cohorts: int = 4
    """Cohorts in flight at once (FedBuff's concurrency)."""
    params: Params = field(default_factory=Params)

    @property
    def smallest(self) -> int:
        """The fewest devices a cohort forms with: ``min_cohort``, and under distributed DP enough to sum."""
        return max(self.min_cohort, self.params.dp_survivors if self.params.distributed_dp else 0)

    @property
    def members(self) -> int:
        """``ceil(K (1 + rho))``."""
        return math.ceil(self.cohort_size * (1 + self.overselect) - 1e-9)


RECENT_COHORTS = 1024
"""Ended cohorts remembered, so that their members' late messages are told apart from strangers'."""
RECENT_DIGESTS = 100_000
"""Masked uploads remembered (SHA-256 of their bytes) to refuse one replayed into another cohort."""


class CohortManager:
    """All cohorts of one aggregator, and the devices waiting for one.

    Args:
        settings: cohort size, overselection, threshold, degree, timeouts, quantization.
        n_values: a device's input length (model parameters + 1).
        verifier: the federation CA, when the deployment has one.
        randbytes: the source of cohort ids.
    """

    def __init__(
        self,
        settings: SecAggSettings,
        *,
        n_values: int,
        verifier: crypto.Verifier | None = None,
        randbytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        if settings.cohort_size < 2 or settings.min_cohort < 2 or settings.max_cohorts < 1:
            raise ValueError("need cohort_size >= 2, min_cohort >= 2 and max_cohorts >= 1")
        self.settings = settings
        self.n_values = n_values
        self.verifier = verifier
        self.randbytes = randbytes
        self.pool: OrderedDict[str, float] = OrderedDict()
        """Devices that checked in and are in no cohort, with when they last checked in (least recent first)."""
        self._since: dict[str, float] = {}
        """When each device in the pool began to wait: a check-in again does not restart its ``form_wait``."""
        self.cohorts: dict[str, CohortServer] = {}
        self.member_of: dict[str, str] = {}
        self._digests: OrderedDict[bytes, str] = OrderedDict()
        self._ended: OrderedDict[str, frozenset[str]] = OrderedDict()
        """Recently ended cohorts and their members: a member's late message is flow control."""
        self.formed = 0
        self.applied = 0
        self.abandoned = 0

    def check_in(self, agent: str, msg: CheckIn, now: float, *, version: int, run: str | None) -> list[Out]:
        """``agent`` is ready for a cohort (if it was in one, it has left it).

        A device in the pool checks in every few seconds, so a check-in can cross the
        announcement of the cohort just formed for it. From a member that has not sent that
        cohort its keys yet, it is taken as that: the device stays a member and is sent the
        announcement again (which also brings back a device that restarted meanwhile).
        """
        out: list[Out] = []
        current = self.member_of.get(agent)
        if current is not None:
            cohort = self.cohorts[current]
            if isinstance(cohort.state, CollectingKeys) and agent not in cohort.keys and agent not in cohort.gone:
                return [SendTo(agent, cohort.announce)]
            # It gave its cohort up (restarted, or timed out) after the first round: the cohort stops waiting.
            del self.member_of[agent]
            out += self._settle(cohort.offline(agent, now), now)
        self._since.setdefault(agent, now)
        self.pool.pop(agent, None)
        self.pool[agent] = now
        return out + self.form(now, version=version, run=run)

    def receive(self, agent: str, msg: UpMessage, now: float, check: Check | None = None) -> list[Out]:
        """A device's message for a cohort."""
        cohort = self.cohorts.get(msg.cohort)
        if cohort is None:
            if agent in self._ended.get(msg.cohort, ()):  # its own cohort ended before this arrived
                return [Reject(agent, RejectReason.LATE_UPLOAD, f"cohort {msg.cohort[:8]} has ended")]
            return [Reject(agent, RejectReason.WRONG_COHORT, f"cohort {msg.cohort[:8]} is not open")]
        if self.member_of.get(agent) != msg.cohort:
            return [Reject(agent, RejectReason.NOT_MEMBER, f"{agent!r} is not in cohort {msg.cohort[:8]}")]
        if isinstance(msg, MaskedMsg):
            digest = hashlib.sha256(msg.data).digest()
            earlier = self._digests.get(digest)
            if earlier is not None and earlier != msg.cohort:
                return [Reject(agent, RejectReason.REPLAYED, f"these bytes were uploaded in cohort {earlier[:8]}")]
            self._digests[digest] = msg.cohort
            while len(self._digests) > RECENT_DIGESTS:
                self._digests.popitem(last=False)
        return self._settle(cohort.receive(agent, msg, now, check), now)

    def leave(self, agent: str) -> None:
        """``agent`` may join no cohort for now (its privacy ledger says so): out of the pool, until it checks in again.

        A device whose cohort was summed waits in the pool without a check-in; the caller, which
        checks participation limits at check-in, takes out the ones the sum just spent.
        """
        self.pool.pop(agent, None)
        self._since.pop(agent, None)

    def offline(self, agent: str, now: float) -> list[Out]:
        """``agent`` went offline: out of the pool, and its cohort stops waiting for it."""
        self.pool.pop(agent, None)
        self._since.pop(agent, None)
        current = self.member_of.get(agent)
        return self._settle(self.cohorts[current].offline(agent, now), now) if current is not None else []

    def tick(self, now: float, *, version: int, run: str | None) -> list[Out]:
        """Time passed: round timeouts, and maybe a new cohort."""
        out: list[Out] = []
        for cohort in list(self.cohorts.values()):
            out += self._settle(cohort.tick(now), now)
        stale = now - 3 * self.settings.timeout  # devices in the pool check in again every few seconds
        while self.pool and next(iter(self.pool.values())) < stale:
            gone, _ = self.pool.popitem(last=False)
            self._since.pop(gone, None)
        return out + self.form(now, version=version, run=run)

    def form(self, now: float, *, version: int, run: str | None) -> list[Out]:
        """Form cohorts while enough devices wait: ``ceil(K (1 + rho))`` at once, or fewer after a timeout."""
        s = self.settings
        out: list[Out] = []
        while self.pool and len(self.cohorts) < s.max_cohorts:
            oldest = min(self._since.get(a, t) for a, t in self.pool.items())
            waited = now - oldest >= s.form_wait
            if len(self.pool) < s.members and not (waited and len(self.pool) >= s.smallest):
                break
            members = tuple(sorted(list(self.pool)[: s.members]))
            out += self._open(members, now, version=version, run=run)
        return out

    def _open(self, members: Sequence[str], now: float, *, version: int, run: str | None) -> list[Out]:
        s = self.settings
        n = len(members)
        degree = s.degree if s.degree and s.degree < n - 1 else auto_degree(n)
        if degree < n - 1 and degree % 2:
            degree += 1
        degree = min(degree, n - 1)
        t = threshold_for(degree + 1, s.threshold)
        announce = CohortMsg(self.randbytes(16).hex(), tuple(members), degree, t, s.params, version, s.timeout, run)
        # K, or for a smaller cohort all but its share of dropouts (rho / (1 + rho) of it)
        target = min(s.cohort_size, n - math.floor(n * s.overselect / (1 + s.overselect) + 1e-9))
        floor = max(t, s.params.dp_survivors if s.params.distributed_dp else 0)
        cohort = CohortServer(
            announce, target=max(target, floor), n_values=self.n_values, now=now, verifier=self.verifier
        )
        self.cohorts[cohort.id] = cohort
        for a in members:
            self.pool.pop(a, None)
            self._since.pop(a, None)
            self.member_of[a] = cohort.id
        self.formed += 1
        return [Formed(cohort.id, cohort.members), *(SendTo(a, announce) for a in members)]

    def _settle(self, out: list[Out], now: float) -> list[Out]:
        """After a cohort's step: forget it once it ended, and free its devices.

        The devices of an abandoned cohort are told so here (they check in again); those of a
        summed one are told by the caller once the sum is applied and durable
        (:func:`done_messages`).
        """
        told: list[Out] = []
        for o in out:
            if isinstance(o, (Unmasked, Abandoned)):
                cohort = self.cohorts.get(o.cohort)
                self.close(o.cohort)
                if cohort is not None and isinstance(o, Unmasked):
                    # The devices that answered its last round are there: they wait for the next
                    # cohort without a check-in (the others check in when they are ready).
                    for a in sorted(set(cohort.reveals) - cohort.gone):
                        if a not in self.member_of:
                            self.pool.pop(a, None)
                            self.pool[a] = now
                            self._since.setdefault(a, now)
                if isinstance(o, Unmasked):
                    self.applied += 1
                else:
                    self.abandoned += 1
                    version = cohort.announce.version if cohort is not None else 0
                    told += done_messages(o.cohort, o.members, "abandoned", version, o.reason)
        return out + told

    def close(self, cohort_id: str) -> None:
        """Forget a cohort (ended, or abandoned after a restart)."""
        cohort = self.cohorts.pop(cohort_id, None)
        if cohort is None:
            return
        self._ended[cohort_id] = frozenset(cohort.members)
        while len(self._ended) > RECENT_COHORTS:
            self._ended.popitem(last=False)
        for a in cohort.members:
            if self.member_of.get(a) == cohort_id:
                del self.member_of[a]

    def in_flight(self) -> dict[str, str]:
        """Each open cohort and the round it is in."""
        return {c: s.phase for c, s in self.cohorts.items()}


def done_messages(cohort: str, members: Sequence[str], status: str, version: int, reason: str | None) -> list[Out]:
    """A :class:`DoneMsg` to each member."""
    done = DoneMsg(cohort, status, version, reason)  # type: ignore[arg-type]
    return [SendTo(a, done) for a in members]
