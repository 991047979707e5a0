"""Sharded FedBuff: shards reduce updates to partial sums, one leader merges them (sans-IO).

The cluster service (:mod:`aggregator.cluster`) runs N shards that share the updates of one
durable JetStream consumer, and one leader, elected through a JetStream KV lease. This
module decides; it does no I/O and takes every value (the time included) as an argument.

**The buffer, split.** FedBuff (Nguyen et al., AISTATS 2022, arXiv:2106.06639, Alg. 1) steps
once ``K`` deltas are buffered::

    w <- w + eta_g * sum_i c_i delta_i / sum_i c_i,     c_i = n_i * s(staleness_i)

A shard validates each update it is handed (:func:`aggregator.core.gate`: layout, finite,
norm; staleness; duplicates) and keeps the running ``sum_i c_i delta_i`` and ``sum_i c_i`` of
the ones it accepts: a :class:`Partial`, which it hands to the leader after ``partial_size``
updates or ``partial_wait`` seconds. The leader adds partials until they hold ``K`` updates
and steps. The sum is associative, so the step is the one a single aggregator would take
over the same updates with the same staleness (``tests/test_sharding.py`` checks it against
the single-process rule).

**Exactly once.** The leader's state (version, weights, and the window of ``(agent, seq)``
keys applied, with the version each went into) is committed by a compare-and-set write: a
step exists once that write succeeds, and at most one write per revision does, whoever
thinks they lead. A shard holds every message it accepted, unacknowledged, until a committed
state lists its key; then it acknowledges the message and sends the device its receipt. So:

- a shard that dies before the commit: its messages are redelivered to the other shards,
  and its partial, if the leader had it, either was committed (the keys are then in the
  window: the redelivered copies are duplicates, acknowledged and receipted with the
  original version) or was not (they are applied once, now);
- a leader that dies: its buffer (partials taken, not committed) is lost with it, and each
  shard offers its uncommitted partials again to the next leader;
- two partials with a key in common (a redelivery raced the first shard's partial) never
  both go in: the leader refuses the second as a whole; that shard acknowledges only the
  keys it has seen committed and hands every other message back for redelivery (the first
  partial may still die in the leader's buffer, its shard with it).

**One answer per update.** Whether an update is too stale depends on when a shard looks: a
device's re-sent copy can reach shard B after the version moved on while its first copy still
waits, unreceipted, in shard A's partial, which the leader will apply. B cannot know that, so
a cluster's shard (``stale_by_commit``) does not refuse a too-stale update on its own: it lists
the key as refused in its next partial, and holds the message. The leader commits refused keys
with its next step, in the window, as :data:`STALE`; a partial listing a key another partial
already holds, as update or as refusal, is refused as a duplicate like any overlap. So the
committed state decides once, for every copy: the device is told ``accepted`` or ``rejected``
(``too_stale``), never both, and never ``rejected`` for an update the model holds. The price:
a refusal is answered with the next step, not at once.

The window is bounded (:attr:`AppliedWindow.per_agent` keys per agent): a device re-sends only
updates not yet receipted, from an outbox of at most 16 (``agent.outbox_max``).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from aggregator.core import gate
from fedmq.codec import DEFAULT_LIMITS, DecodeLimits, decode_tensors, encode_tensors, pack, unpack
from fedmq.errors import DecodeError, RejectReason
from fedmq.messages import ReceiptMessage, UpdateMessage
from fedmq.staleness import StalenessFn

Tensors = dict[str, npt.NDArray[Any]]
Key = tuple[str, int]
"""An update's identity: ``(agent_id, seq)``."""
PARTIAL_SCHEMA = 1
STALE = -1
"""In an :class:`AppliedWindow`, in place of a version: the update was refused as too stale."""


@dataclass(frozen=True)
class Contribution:
    """One update inside a partial: its key, its FedBuff weight ``c_i`` and its staleness."""

    agent_id: str
    seq: int
    weight: float
    staleness: int

    @property
    def key(self) -> Key:
        """``(agent_id, seq)``."""
        return (self.agent_id, self.seq)


@dataclass(frozen=True)
class Partial:
    """A shard's ``sum_i c_i delta_i`` over the updates it lists, offered to the leader."""

    shard: str
    pid: int
    """The shard's number for it (increasing; an offer made again keeps it)."""
    version: int
    """The version the shard computed staleness against."""
    contributions: tuple[Contribution, ...]
    total: float
    """``sum_i c_i`` (0 for a partial of refusals only)."""
    tensors: Tensors
    """``sum_i c_i delta_i`` (empty for a partial of refusals only)."""
    refused: tuple[Key, ...] = ()
    """Updates this shard found too stale, to be refused through the commit (``stale_by_commit``)."""

    @property
    def keys(self) -> list[Key]:
        """The keys of its updates, then those of its refusals."""
        return [c.key for c in self.contributions] + list(self.refused)

    def to_bytes(self) -> bytes:
        """msgpack, schema :data:`PARTIAL_SCHEMA`."""
        return pack(
            {
                "schema": PARTIAL_SCHEMA,
                "shard": self.shard,
                "pid": self.pid,
                "version": self.version,
                "contributions": [[c.agent_id, c.seq, c.weight, c.staleness] for c in self.contributions],
                "total": self.total,
                "tensors": encode_tensors(self.tensors),
                "refused": [list(k) for k in self.refused],
            }
        )

    @classmethod
    def from_bytes(cls, payload: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> Partial:
        """Decode and check a partial (a peer's bytes, even inside the cluster)."""
        obj = unpack(payload, limits)
        if obj.get("schema") != PARTIAL_SCHEMA:
            raise DecodeError(RejectReason.SCHEMA_VERSION, f"partial schema {obj.get('schema')!r}, expected 1")
        rows, refused_rows = obj.get("contributions"), obj.get("refused", [])
        if not isinstance(rows, list) or len(rows) > limits.max_array_len:
            raise DecodeError(RejectReason.BAD_FIELD, "contributions must be a list")
        if not isinstance(refused_rows, list) or len(refused_rows) > limits.max_array_len:
            raise DecodeError(RejectReason.BAD_FIELD, "refused must be a list")
        if not rows and not refused_rows:
            raise DecodeError(RejectReason.BAD_FIELD, "a partial lists no update and no refusal")
        refused: list[Key] = []
        for row in refused_rows:
            if not (isinstance(row, list) and len(row) == 2 and isinstance(row[0], str) and type(row[1]) is int):
                raise DecodeError(RejectReason.BAD_FIELD, "a refusal is [agent_id, seq]")
            refused.append((row[0], row[1]))
        contributions = []
        for row in rows:
            if not (
                isinstance(row, list)
                and len(row) == 4
                and isinstance(row[0], str)
                and type(row[1]) is int
                and isinstance(row[2], float)
                and type(row[3]) is int
                and math.isfinite(row[2])
                and row[2] > 0
                and row[3] >= 0
            ):
                what = "a contribution is [agent_id, seq, weight > 0, staleness >= 0]"
                raise DecodeError(RejectReason.BAD_FIELD, what)
            contributions.append(Contribution(row[0], row[1], row[2], row[3]))
        if len({c.key for c in contributions} | set(refused)) != len(contributions) + len(refused):
            raise DecodeError(RejectReason.BAD_FIELD, "a partial lists an update twice")
        total = obj.get("total")
        weights = math.fsum(c.weight for c in contributions)
        if not isinstance(total, float) or not math.isclose(total, weights, rel_tol=1e-9):
            raise DecodeError(RejectReason.BAD_FIELD, "total is not the sum of the contributions' weights")
        shard, pid, version = obj.get("shard"), obj.get("pid"), obj.get("version")
        if not isinstance(shard, str) or type(pid) is not int or type(version) is not int or version < 0:
            raise DecodeError(RejectReason.BAD_FIELD, "shard (str), pid and version (int >= 0) are required")
        tensors = decode_tensors(obj.get("tensors"), where="tensors", limits=limits)
        return cls(shard, pid, version, tuple(contributions), total, tensors, tuple(refused))


class AppliedWindow:
    """The keys settled, each with the version it went into (or :data:`STALE`): the dedupe state.

    Per agent the newest :attr:`per_agent` seqs are kept; agents beyond ``max_agents`` go out
    least recently applied first.
    """

    per_agent = 64

    def __init__(self, max_agents: int = 100_000) -> None:
        self.max_agents = max_agents
        self._agents: OrderedDict[str, dict[int, int]] = OrderedDict()

    def get(self, key: Key) -> int | None:
        """The version ``key`` went into, :data:`STALE` if it was refused, or ``None``."""
        seqs = self._agents.get(key[0])
        return None if seqs is None else seqs.get(key[1])

    def add(self, keys: Sequence[Key], version: int) -> None:
        """``keys`` went into ``version``."""
        for agent, seq in keys:
            seqs = self._agents.pop(agent, None) or {}
            seqs[seq] = version
            if len(seqs) > self.per_agent:
                for old in sorted(seqs)[: len(seqs) - self.per_agent]:
                    del seqs[old]
            self._agents[agent] = seqs
        while len(self._agents) > self.max_agents:
            self._agents.popitem(last=False)

    def to_wire(self) -> list[list[Any]]:
        """``[[agent, [[seq, version], ...]], ...]``, least recently applied first."""
        return [[a, [[s, v] for s, v in sorted(seqs.items())]] for a, seqs in self._agents.items()]

    @classmethod
    def from_wire(cls, rows: Any, max_agents: int = 100_000) -> AppliedWindow:
        """The inverse of :meth:`to_wire` (from the cluster's own committed state)."""
        window = cls(max_agents)
        if not isinstance(rows, list):
            raise ValueError("the applied window is a list")
        for agent, seqs in rows:
            window._agents[str(agent)] = {int(s): int(v) for s, v in seqs}
        return window

    def copy(self) -> AppliedWindow:
        """An independent copy."""
        other = AppliedWindow(self.max_agents)
        other._agents = OrderedDict((a, dict(s)) for a, s in self._agents.items())
        return other


# --- the leader ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LeaderState:
    """What the leader commits: the model, its version, the applied window."""

    version: int
    weights: Tensors
    window: AppliedWindow
    keys: tuple[Key, ...] = ()
    """The updates of the step that made this version (a new leader announces them again)."""
    refused: tuple[Key, ...] = ()
    """The updates refused as too stale with that step (announced with it)."""


@dataclass(frozen=True)
class Taken:
    """The partial is in the leader's buffer (not yet committed)."""

    shard: str
    pid: int


@dataclass(frozen=True)
class Refused:
    """The partial is not taken; ``duplicates`` are keys already applied or buffered."""

    shard: str
    pid: int
    reason: str
    duplicates: tuple[Key, ...] = ()


@dataclass(frozen=True)
class Step:
    """A FedBuff step to commit: the state after it, and what it holds."""

    state: LeaderState
    keys: tuple[Key, ...]
    partials: tuple[tuple[str, int], ...]


class LeaderCore:
    """Merges partials into FedBuff steps over a committed :class:`LeaderState`.

    Feed :meth:`offer`; a :class:`Step` it returns must be written (compare-and-set) and then
    confirmed with :meth:`committed`, or, if another writer got there first, replaced with
    :meth:`lost`. Offers are taken one at a time; none may come between a step and its
    confirmation.
    """

    def __init__(self, state: LeaderState, *, buffer_size: int, server_lr: float = 1.0) -> None:
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        if not (math.isfinite(server_lr) and server_lr > 0):
            raise ValueError(f"server_lr must be > 0, got {server_lr}")
        self.state = state
        self.buffer_size = buffer_size
        self.server_lr = server_lr
        self._buffer: list[Partial] = []
        self._step: Step | None = None

    @property
    def buffered(self) -> int:
        """Updates in the buffer (refusals do not count towards ``K``)."""
        return sum(len(p.contributions) for p in self._buffer)

    def offer(self, partial: Partial) -> tuple[Taken | Refused, Step | None]:
        """Take ``partial`` into the buffer, or refuse it; a full buffer makes a step."""
        assert self._step is None, "a step awaits its commit"
        for p in self._buffer:
            if (p.shard, p.pid) == (partial.shard, partial.pid):
                if p.keys == partial.keys:
                    return Taken(partial.shard, partial.pid), None  # offered again (an answer was lost)
                # Not the same partial: a shard id reused by a restarted process (ours to prevent:
                # the service gives each shard process an id of its own).
                return Refused(partial.shard, partial.pid, "this shard id and pid name another partial"), None
        why = gate_partial(self.state.weights, partial)
        if why is not None:
            return Refused(partial.shard, partial.pid, why), None
        buffered = {k for p in self._buffer for k in p.keys}
        dups = tuple(k for k in partial.keys if k in buffered or self.state.window.get(k) is not None)
        if dups:
            return Refused(partial.shard, partial.pid, "duplicates", dups), None
        self._buffer.append(partial)
        if self.buffered < self.buffer_size:
            return Taken(partial.shard, partial.pid), None
        self._step = self._make_step()
        return Taken(partial.shard, partial.pid), self._step

    def _make_step(self) -> Step:
        sums = [p for p in self._buffer if p.contributions]  # at least one: K >= 1 updates are buffered
        total = math.fsum(p.total for p in sums)
        weights = self.state.weights
        new: Tensors = {}
        for k, w in weights.items():
            acc = np.zeros(w.shape, np.float64)
            for p in sums:
                acc += p.tensors[k]
            new[k] = (w + (self.server_lr * acc / total).astype(w.dtype)).astype(w.dtype, copy=False)
        window = self.state.window.copy()
        version = self.state.version + 1
        keys = tuple(c.key for p in self._buffer for c in p.contributions)
        refused = tuple(k for p in self._buffer for k in p.refused)
        window.add(keys, version)
        window.add(refused, STALE)
        partials = tuple((p.shard, p.pid) for p in self._buffer)
        return Step(LeaderState(version, new, window, keys, refused), keys, partials)

    def committed(self) -> Step:
        """The step's write succeeded: it is the state now; the buffer starts empty."""
        step = self._step
        assert step is not None, "no step awaits its commit"
        self.state, self._step, self._buffer = step.state, None, []
        return step

    def lost(self, state: LeaderState) -> list[Refused]:
        """Another writer committed ``state`` first: adopt it; buffered partials that overlap it are refused."""
        self.state, self._step = state, None
        kept: list[Partial] = []
        refused: list[Refused] = []
        for p in self._buffer:
            dups = tuple(k for k in p.keys if state.window.get(k) is not None)
            if dups:
                refused.append(Refused(p.shard, p.pid, "duplicates", dups))
            else:
                kept.append(p)
        self._buffer = kept
        return refused

    def pending_step(self) -> Step | None:
        """After :meth:`lost`: the buffer may still be full enough for a step."""
        assert self._step is None
        if self._buffer and self.buffered >= self.buffer_size:
            self._step = self._make_step()
        return self._step


def gate_partial(reference: Mapping[str, npt.NDArray[Any]], partial: Partial) -> str | None:
    """Why a partial cannot be added to the model, or ``None``: its layout, finiteness, weights."""
    if not partial.contributions:  # refusals only: nothing to add
        return None if partial.total == 0 and not partial.tensors else "a partial of refusals only carries a sum"
    if not (math.isfinite(partial.total) and partial.total > 0):
        return f"total weight {partial.total!r} is not > 0"
    if partial.tensors.keys() != reference.keys():
        return "tensor names differ from the model's"
    for k, ref in reference.items():
        t = partial.tensors[k]
        if t.shape != ref.shape or t.dtype != ref.dtype:
            return f"tensor {k!r} is {t.dtype}{list(t.shape)}, model has {ref.dtype}{list(ref.shape)}"
        if not np.isfinite(t).all():
            return f"tensor {k!r} is not finite"
    return None


# --- a shard ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ack:
    """Acknowledge these messages: they are done with (applied, duplicates, or refused for good)."""

    tokens: tuple[int, ...]


@dataclass(frozen=True)
class Nak:
    """Hand these messages back for redelivery (to any shard)."""

    tokens: tuple[int, ...]


@dataclass(frozen=True)
class Receipt:
    """Tell a device what became of its update."""

    receipt: ReceiptMessage


@dataclass(frozen=True)
class Offer:
    """Offer this partial to the leader (again, after a leader change)."""

    partial: Partial


@dataclass(frozen=True)
class Settled:
    """An offered partial is done with.

    ``applied`` in ``version`` (its receipts go out with this), or refused for good (``applied``
    false: a sum made elsewhere, with no messages to hand back).
    """

    pid: int
    version: int
    applied: bool
    reason: str | None = None


ShardEffect = Ack | Nak | Receipt | Offer | Settled


@dataclass
class _Open:
    """The partial being filled: its sum, weights, keys and the messages behind them."""

    pid: int
    opened: float
    sums: Tensors
    contributions: list[Contribution] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    refused: list[Key] = field(default_factory=list)
    refused_tokens: list[int] = field(default_factory=list)

    @property
    def keys(self) -> list[Key]:
        return [c.key for c in self.contributions] + self.refused


@dataclass
class _Offered:
    partial: Partial
    tokens: list[int]
    """The messages behind ``partial.keys``, in that order (none for a sum restored or adopted)."""


class ShardCore:
    """One shard: validates updates, fills partials, and settles them as commits arrive.

    ``shard`` names this process, not the slot it fills: a restarted shard takes a new id
    (its partials are numbered from 1 again, and the leader tells partials apart by both).

    Inputs: :meth:`update` (a message from the shared consumer, with its ``token``),
    :meth:`due` (time passed), :meth:`answer` (the leader's to an offer), :meth:`commit` (a
    committed leader state, in the order committed) and :meth:`new_leader`.
    """

    def __init__(
        self,
        shard: str,
        reference: Mapping[str, npt.NDArray[Any]],
        *,
        version: int,
        staleness: StalenessFn,
        max_staleness: int,
        max_update_norm: float,
        max_num_examples: int,
        partial_size: int,
        partial_wait: float,
        min_agents: int = 1,
        first_pid: int = 1,
        stale_by_commit: bool = False,
    ) -> None:
        if partial_size < 1 or not partial_wait > 0 or min_agents < 1 or first_pid < 1:
            raise ValueError("partial_size, min_agents and first_pid must be >= 1, partial_wait > 0")
        self.shard = shard
        self.reference = {k: np.zeros(v.shape, v.dtype) for k, v in reference.items()}
        self.version = version
        self.window = AppliedWindow()
        self.staleness = staleness
        self.max_staleness = max_staleness
        self.max_update_norm = max_update_norm
        self.max_num_examples = max_num_examples
        self.partial_size = partial_size
        self.partial_wait = partial_wait
        self.min_agents = min_agents
        """A partial leaves only with the updates of at least this many devices (a site's floor)."""
        self.stale_by_commit = stale_by_commit
        """Refuse a too-stale update through the leader's commit, not at once (see the module's docs)."""
        self._next_pid = first_pid
        self._open: _Open | None = None
        self._offered: dict[int, _Offered] = {}
        self.accepted = 0
        self.rejected: dict[str, int] = {}

    def _held(self) -> set[Key]:
        keys = {k for o in self._offered.values() for k in o.partial.keys}
        if self._open is not None:
            keys.update(self._open.keys)
        return keys

    def _held_tokens(self) -> set[int]:
        tokens = {t for o in self._offered.values() for t in o.tokens}
        if self._open is not None:
            tokens.update(self._open.tokens + self._open.refused_tokens)
        return tokens

    def _settled(self, key: Key, version: int, *, count: bool = False) -> Receipt:
        """The receipt for an update the committed window lists (applied, or refused: :data:`STALE`)."""
        if version != STALE:
            return Receipt(ReceiptMessage(key[0], key[1], "accepted", version))
        if count:
            self.rejected[RejectReason.TOO_STALE.value] = self.rejected.get(RejectReason.TOO_STALE.value, 0) + 1
        return Receipt(ReceiptMessage(key[0], key[1], "rejected", self.version, RejectReason.TOO_STALE.value))

    def _box(self, now: float) -> _Open:
        if self._open is None:
            sums = {k: np.zeros(v.shape, np.float64) for k, v in self.reference.items()}
            self._open = _Open(self._next_pid, now, sums)
            self._next_pid += 1
        return self._open

    def update(self, token: int, update: UpdateMessage, *, topic_agent: str, now: float) -> list[ShardEffect]:
        """A device's update (already decoded and checked by :meth:`UpdateMessage.from_bytes`)."""
        key = (update.agent_id, update.seq)
        if update.agent_id != topic_agent:
            why = f"the topic names agent {topic_agent!r}"
            return self._refuse(token, topic_agent, update.seq, RejectReason.AGENT_ID_MISMATCH, why)
        applied = self.window.get(key)
        if applied is not None:  # a re-send of a settled update: its receipt again
            return [Ack((token,)), self._settled(key, applied)]
        if token in self._held_tokens():
            return []  # the same message again (its ack wait ran out): still held, still ours
        if key in self._held():
            return [Ack((token,))]  # a second copy: the first one holds its place and gets the receipt
        if update.base_version > self.version:
            return [Nak((token,))]  # from a newer version than this shard has seen yet: later, or elsewhere
        staleness = self.version - update.base_version
        if staleness > self.max_staleness:
            if self.stale_by_commit:  # another shard may hold a copy the leader will apply: the commit decides
                box = self._box(now)
                box.refused.append(key)
                box.refused_tokens.append(token)
                return []
            why = f"staleness {staleness} > {self.max_staleness}"
            return self._refuse(token, update.agent_id, update.seq, RejectReason.TOO_STALE, why)
        bad, _ = gate(self.reference, update.delta, self.max_update_norm)
        if bad is not None:
            return self._refuse(token, update.agent_id, update.seq, bad[0], bad[1])
        weight = float(min(update.num_examples, self.max_num_examples)) * float(self.staleness(staleness))
        box = self._box(now)
        for k, acc in box.sums.items():
            acc += weight * update.delta[k]
        box.contributions.append(Contribution(update.agent_id, update.seq, weight, staleness))
        box.tokens.append(token)
        self.accepted += 1
        if len(box.contributions) >= self.partial_size and self._enough(box):
            return self._close()
        return []

    def _enough(self, box: _Open) -> bool:
        if not box.contributions:  # refusals only: they carry no sum to protect
            return bool(box.refused)
        return len({c.agent_id for c in box.contributions}) >= self.min_agents

    def _refuse(self, token: int, agent: str, seq: int, reason: RejectReason, detail: str) -> list[ShardEffect]:
        self.rejected[reason.value] = self.rejected.get(reason.value, 0) + 1
        del detail  # the receipt names the reason; the service logs the detail
        return [Ack((token,)), Receipt(ReceiptMessage(agent, seq, "rejected", self.version, reason.value))]

    def due(self, now: float) -> list[ShardEffect]:
        """Time passed: an open partial older than ``partial_wait`` is offered as it is."""
        if self._open is not None and now - self._open.opened >= self.partial_wait and self._enough(self._open):
            return self._close()
        return []

    def flush(self) -> list[ShardEffect]:
        """Offer the open partial now (shutdown), if it holds ``min_agents`` devices; else hand it back."""
        if self._open is None:
            return []
        if self._enough(self._open):
            return self._close()
        tokens, self._open = tuple(self._open.tokens + self._open.refused_tokens), None
        return [Nak(tokens)]

    def _close(self) -> list[ShardEffect]:
        box = self._open
        assert box is not None
        self._open = None
        # A partial of refusals only carries no sum (nothing for the leader to add).
        tensors = {k: a.astype(self.reference[k].dtype) for k, a in box.sums.items()} if box.contributions else {}
        total = math.fsum(c.weight for c in box.contributions)
        contributions, refused = tuple(box.contributions), tuple(box.refused)
        partial = Partial(self.shard, box.pid, self.version, contributions, total, tensors, refused)
        self._offered[box.pid] = _Offered(partial, box.tokens + box.refused_tokens)
        return [Offer(partial)]

    def answer(self, answer: Taken | Refused) -> list[ShardEffect]:
        """The leader's answer to an offer: taken (wait for its commit) or refused (settle it now)."""
        if isinstance(answer, Taken) or answer.pid not in self._offered:
            return []
        offered = self._offered.pop(answer.pid)
        if not offered.tokens:  # a sum made elsewhere (adopt): no messages to hand back, so it ends here
            keys = offered.partial.keys
            versions = [self.window.get(k) for k in keys]
            out: list[ShardEffect] = [
                self._settled(k, v, count=True) for k, v in zip(keys, versions, strict=True) if v is not None
            ]
            applied = all(v is not None for v in versions)
            return [*out, Settled(answer.pid, self.version, applied, None if applied else answer.reason)]
        # Only a duplicate this shard has seen committed is done with: acknowledged, and its
        # receipt sent again. Everything else goes back to the stream to be decided again, by
        # any shard, including duplicates of a partial still in the leader's buffer: that
        # buffer dies with the leader, and the other copy's holder may have died too.
        out = []
        done, back = [], []
        for key, token in zip(offered.partial.keys, offered.tokens, strict=True):
            version = self.window.get(key)
            if version is None:
                back.append(token)
            else:
                done.append(token)
                out.append(self._settled(key, version, count=True))
        if done:
            out.insert(0, Ack(tuple(done)))
        if back:
            out.append(Nak(tuple(back)))
        return out

    def commit(self, version: int, window: AppliedWindow) -> list[ShardEffect]:
        """A committed leader state: settle every offered partial it holds (ack, receipt)."""
        self.version = max(self.version, version)
        self.window = window
        out: list[ShardEffect] = []
        for pid in sorted(self._offered):
            offered = self._offered[pid]
            keys = offered.partial.keys
            found = [window.get(k) for k in keys]
            versions = [v for v in found if v is not None]
            if len(versions) == len(keys):
                del self._offered[pid]
                out.append(Ack(tuple(offered.tokens)))
                out += [self._settled(k, v, count=True) for k, v in zip(keys, versions, strict=True)]
                went = max((v for v in versions if v != STALE), default=version)  # the version its step made
                out.append(Settled(pid, went, True))
        return out

    def restore(self, partial: Partial) -> None:
        """A partial offered by this shard's previous life (a site's uplink folder): held again, unsettled.

        Its updates count as held (a device's re-send of one is not summed again) until
        :meth:`commit` settles it or :meth:`drop` takes it back.
        """
        if partial.pid in self._offered or (self._open is not None and self._open.pid == partial.pid):
            raise ValueError(f"partial {partial.pid} is held already")
        self._offered[partial.pid] = _Offered(partial, [])
        self._next_pid = max(self._next_pid, partial.pid + 1)

    def adopt(self, version: int, contributions: Sequence[Contribution], total: float, tensors: Tensors) -> Offer:
        """A sum made elsewhere (a secure-aggregation cohort's), offered as this shard's next partial.

        Its updates are then held like those of a partial this shard filled.
        """
        partial = Partial(self.shard, self._next_pid, version, tuple(contributions), total, tensors)
        self._next_pid += 1
        self._offered[partial.pid] = _Offered(partial, [])
        return Offer(partial)

    def holds(self, key: Key) -> bool:
        """Whether the update ``key`` is in a partial not yet settled (open or offered)."""
        return key in self._held()

    @property
    def next_pid(self) -> int:
        """The number the next partial will get."""
        return self._next_pid

    def reserve(self, pid: int) -> None:
        """Number partials from ``pid`` on at least (numbers a previous life may have used)."""
        self._next_pid = max(self._next_pid, pid)

    def drop(self, pid: int) -> Partial | None:
        """Forget an offered partial that will never be committed (refused for good); ``None`` if unknown."""
        offered = self._offered.pop(pid, None)
        return None if offered is None else offered.partial

    def new_leader(self) -> list[ShardEffect]:
        """Another leader (its buffer started empty): offer every partial not yet committed again."""
        return [Offer(o.partial) for _, o in sorted(self._offered.items())]

    @property
    def holding(self) -> int:
        """Messages held, not yet settled."""
        held = sum(len(o.tokens) for o in self._offered.values())
        if self._open is not None:
            held += len(self._open.tokens) + len(self._open.refused_tokens)
        return held


__all__ = [
    "STALE",
    "Ack",
    "AppliedWindow",
    "Contribution",
    "LeaderCore",
    "LeaderState",
    "Nak",
    "Offer",
    "Partial",
    "Receipt",
    "Refused",
    "Settled",
    "ShardCore",
    "Step",
    "Taken",
    "gate_partial",
]
