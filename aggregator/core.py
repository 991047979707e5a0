"""The sans-IO aggregation core: versioned global model, validation, the rule, and its state.

Everything that affects the global model lives here and nowhere else (the discipline of
h11's ``_state.py``). The core takes decoded messages and plain values and returns
:class:`Accepted` / :class:`Rejected` results; it never awaits, sleeps, reads a clock or
touches a socket. The asyncio service (:mod:`aggregator.service`) feeds it and publishes
what it returns.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from aggregator.robust import Aggregate, WeightedMean
from aggregator.rules.fedasync import fedasync_mix
from aggregator.rules.fedavg import fedavg_step
from aggregator.rules.fedbuff import fedbuff_step, staleness_weight
from aggregator.rules.robust import l2_norms, norm_bound
from aggregator.staleness import StalenessFn
from fedmq.errors import RejectReason
from fedmq.messages import UpdateMessage

Tensors = dict[str, npt.NDArray[Any]]


@dataclass(frozen=True)
class Accepted:
    """An update was taken into the rule; ``new_version`` is set when it produced a new model."""

    agent_id: str
    seq: int
    base_version: int
    staleness: int
    new_version: int | None
    index: int = 0
    """Position in the order of application (1 for the first update ever accepted): a replay of the
    accepted updates sorted by ``index`` rebuilds the model bit for bit."""


@dataclass(frozen=True)
class Rejected:
    """An update was refused; the fault is the sender's. ``reason`` is counted in metrics."""

    agent_id: str | None
    seq: int | None
    reason: RejectReason
    detail: str


@dataclass
class Stats:
    """Counters the service publishes as metrics."""

    accepted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    staleness_sum: int = 0
    max_epsilon: float = 0.0
    dropped_overload: int = 0
    """Messages dropped before decoding because the incoming queue was full (our capacity, not a peer's fault)."""

    @property
    def mean_staleness(self) -> float:
        """Mean staleness of accepted updates (0 before the first one)."""
        return self.staleness_sum / self.accepted if self.accepted else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain-value form for checkpoints and metrics."""
        return {
            "accepted": self.accepted,
            "rejected": dict(self.rejected),
            "staleness_sum": self.staleness_sum,
            "max_epsilon": self.max_epsilon,
            "dropped_overload": self.dropped_overload,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Stats:
        """Inverse of :meth:`to_dict`."""
        return cls(
            int(d["accepted"]),
            Counter({str(k): int(v) for k, v in d["rejected"].items()}),
            int(d["staleness_sum"]),
            float(d["max_epsilon"]),
            int(d.get("dropped_overload", 0)),
        )


class Rule(Protocol):
    """A stateful aggregation strategy that the core drives. Rules never see transport types."""

    name: str
    needs_history: bool
    mode: str
    counters: Counter[str]
    """What robust aggregation did so far (deltas clipped, excluded); published as metrics."""

    def add(
        self,
        weights: Tensors,
        base: Tensors | None,
        delta: Tensors,
        *,
        staleness: int,
        num_examples: int,
        agent_id: str,
    ) -> Tensors | None:
        """Take one validated update; return new global weights when the version advances.

        A rule may keep references to ``delta``'s arrays (no copy on the hot path): callers
        hand over decoded, read-only tensors and never mutate them afterwards.
        """
        ...

    def state_dict(self) -> dict[str, Any]:
        """Rule state as plain values and arrays (for checkpoints)."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        ...


class FedAsyncRule:
    """FedAsync (Xie et al. 2019): every update makes a new version, mixed with ``alpha * s(staleness)``."""

    name = "fedasync"
    needs_history = True
    mode = "async"

    def __init__(self, alpha: float, staleness_fn: StalenessFn, *, max_norm: float | None = None) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        if max_norm is not None and not max_norm > 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm}")
        self.alpha = alpha
        self.staleness_fn = staleness_fn
        self.max_norm = max_norm
        self.counters: Counter[str] = Counter()

    def add(
        self,
        weights: Tensors,
        base: Tensors | None,
        delta: Tensors,
        *,
        staleness: int,
        num_examples: int,
        agent_id: str,
    ) -> Tensors | None:
        """Mix immediately (after norm bounding, when configured)."""
        assert base is not None, "FedAsync needs the base version"
        if self.max_norm is not None:
            (bounded,), clipped = norm_bound([delta], self.max_norm)
            self.counters["clipped"] += clipped
            delta = bounded
        return fedasync_mix(weights, base, delta, self.alpha * self.staleness_fn(staleness))

    def state_dict(self) -> dict[str, Any]:
        """FedAsync keeps no state beyond the model."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing to restore."""


class FedBuffRule:
    """FedBuff (Nguyen et al. 2022): buffer ``K`` deltas weighted by ``n * s(staleness)``, then one server step."""

    name = "fedbuff"
    needs_history = False
    mode = "async"

    def __init__(
        self,
        buffer_size: int,
        staleness_fn: StalenessFn,
        *,
        server_lr: float = 1.0,
        momentum: float = 0.0,
        aggregate: Aggregate | None = None,
    ) -> None:
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        self.aggregate = aggregate or WeightedMean()
        self.counters = self.aggregate.counters
        self.buffer_size = buffer_size
        self.staleness_fn = staleness_fn
        self.server_lr = server_lr
        self.momentum = momentum
        self.buffer: list[tuple[Tensors, float]] = []
        self.velocity: Tensors | None = None

    def add(
        self,
        weights: Tensors,
        base: Tensors | None,
        delta: Tensors,
        *,
        staleness: int,
        num_examples: int,
        agent_id: str,
    ) -> Tensors | None:
        """Buffer the delta; step when the buffer holds ``K``."""
        self.buffer.append((dict(delta), staleness_weight(num_examples, self.staleness_fn(staleness))))
        if len(self.buffer) < self.buffer_size:
            return None
        deltas, ws = zip(*self.buffer, strict=True)
        new, self.velocity = fedbuff_step(
            weights,
            deltas,
            ws,
            server_lr=self.server_lr,
            momentum=self.momentum,
            velocity=self.velocity,
            aggregate=self.aggregate,
        )
        self.buffer.clear()
        return new

    def state_dict(self) -> dict[str, Any]:
        """The buffer and the momentum state."""
        return {"buffer": [{"delta": d, "weight": w} for d, w in self.buffer], "velocity": self.velocity}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the buffer and the momentum state."""
        self.buffer = [(dict(e["delta"]), float(e["weight"])) for e in state["buffer"]]
        self.velocity = dict(state["velocity"]) if state["velocity"] is not None else None


class SyncFedAvgRule:
    """Synchronous FedAvg baseline: a round waits for every selected agent, then averages by example count."""

    name = "fedavg"
    needs_history = False
    mode = "sync"

    def __init__(self, aggregate: Aggregate | None = None) -> None:
        self.aggregate = aggregate or WeightedMean()
        self.counters = self.aggregate.counters
        self.received: list[tuple[Tensors, int]] = []

    def add(
        self,
        weights: Tensors,
        base: Tensors | None,
        delta: Tensors,
        *,
        staleness: int,
        num_examples: int,
        agent_id: str,
    ) -> Tensors | None:
        """Collect; the core decides when the round is complete and calls :meth:`finish`."""
        self.received.append((dict(delta), num_examples))
        return None

    def finish(self, weights: Tensors) -> Tensors:
        """Average the round's deltas into the model."""
        deltas, ns = zip(*self.received, strict=True)
        self.received.clear()
        return fedavg_step(weights, deltas, ns, aggregate=self.aggregate)

    def state_dict(self) -> dict[str, Any]:
        """The deltas received in the open round."""
        return {"received": [{"delta": d, "num_examples": n} for d, n in self.received]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the open round."""
        self.received = [(dict(e["delta"]), int(e["num_examples"])) for e in state["received"]]


RECEIPTS_KEPT = 4096
"""At most this many accepted ``seq -> (version, index)`` remembered per agent: the exactly-once window.

A seq in the window is a duplicate (answered with its original receipt); a seq not in it is
new, even if a higher one was accepted first (an outbox re-send after a reconnect can arrive
after a newer update). The agent tells, with each update, the oldest seq still waiting in its
outbox (``oldest_pending``); everything below it has its receipt and is forgotten, and a seq
below it is refused as a duplicate. The cap only matters for an agent that never advances it."""


class AggregatorCore:
    """The versioned global model and everything that may change it.

    Args:
        weights: initial global model (copied; float tensors).
        rule: the aggregation rule.
        max_staleness: updates more than this many versions behind are rejected.
        version: the version of ``weights`` (0 for a fresh model).
        sync_agents: in sync mode, agents per round (0: every online agent).
        seed: RNG seed for sync-round selection.
        norm_window: ``(low, high)`` L2 norms outside of which an update is rejected as
            ``not_private`` (see :func:`aggregator.rules.robust.dp_norm_window`); None: off.
    """

    def __init__(
        self,
        weights: Mapping[str, npt.NDArray[Any]],
        rule: Rule,
        *,
        max_staleness: int = 20,
        version: int = 0,
        sync_agents: int = 0,
        seed: int = 0,
        norm_window: tuple[float, float] | None = None,
    ) -> None:
        if max_staleness < 0:
            raise ValueError("max_staleness must be >= 0")
        if norm_window is not None and not 0 <= norm_window[0] < norm_window[1]:
            raise ValueError(f"norm_window must be (low, high) with 0 <= low < high, got {norm_window}")
        self.norm_window = norm_window
        self.rule = rule
        self.max_staleness = 0 if rule.mode == "sync" else max_staleness
        self.version = version
        self._weights: Tensors = _frozen({k: np.array(v) for k, v in weights.items()})
        self._history: dict[int, Tensors] = {version: self._weights} if rule.needs_history else {}
        self.last_seq: dict[str, int] = {}
        self.receipts: dict[str, dict[int, tuple[int, int]]] = {}
        self.floors: dict[str, int] = {}
        """Per agent, the highest ``oldest_pending`` it reported: seqs below are settled."""
        """Per agent, the last :data:`RECEIPTS_KEPT` accepted ``seq -> (version, index)`` (to answer re-sends)."""
        self.stats = Stats()
        self.online: set[str] = set()
        self.sync_agents = sync_agents
        self.selected: tuple[str, ...] | None = None
        self._waiting: set[str] = set()
        self._rng = random.Random(seed)

    # --- reading ---------------------------------------------------------------------------
    @property
    def weights(self) -> Tensors:
        """The current global model (read-only arrays)."""
        return self._weights

    @property
    def mode(self) -> str:
        """``"async"`` or ``"sync"``."""
        return self.rule.mode

    # --- agents ----------------------------------------------------------------------------
    def agent_status(self, agent_id: str, online: bool) -> int | None:
        """Record an agent coming online or going offline; may complete a sync round.

        Returns the new version when a sync round completed because its last awaited agent left.
        """
        if online:
            self.online.add(agent_id)
            return None
        self.online.discard(agent_id)
        if self.mode == "sync" and agent_id in self._waiting:
            self._waiting.discard(agent_id)
            return self._maybe_finish_round()
        return None

    def start_round(self) -> tuple[str, ...]:
        """Sync mode: select the agents the round at the current version waits for.

        Only call while the round has received nothing (at start, or after a round completed).
        """
        if self.mode != "sync":
            raise RuntimeError("start_round is for the sync rule only")
        if isinstance(self.rule, SyncFedAvgRule) and self.rule.received:
            raise RuntimeError("round already has updates; it cannot be re-selected")
        pool = sorted(self.online)
        k = len(pool) if self.sync_agents == 0 else min(self.sync_agents, len(pool))
        self.selected = tuple(sorted(self._rng.sample(pool, k)))
        self._waiting = set(self.selected)
        return self.selected

    @property
    def round_open(self) -> bool:
        """Sync mode: the current round still waits for someone."""
        return bool(self._waiting)

    # --- updates ---------------------------------------------------------------------------
    def receive(self, update: UpdateMessage, *, topic_agent_id: str | None = None) -> Accepted | Rejected:
        """Validate ``update`` and feed it to the rule.

        ``topic_agent_id`` is the agent id taken from the topic the update arrived on; an
        update whose own ``agent_id`` differs is rejected (spoofing).
        """
        aid, seq = update.agent_id, update.seq
        rejected = self._validate(update, topic_agent_id)
        if rejected is not None:
            return self.reject(rejected)
        staleness = self.version - update.base_version
        base = self._history.get(update.base_version) if self.rule.needs_history else None
        new = self.rule.add(
            self._weights, base, update.delta, staleness=staleness, num_examples=update.num_examples, agent_id=aid
        )
        self.last_seq[aid] = max(seq, self.last_seq.get(aid, seq))
        self.stats.accepted += 1
        self.stats.staleness_sum += staleness
        if update.epsilon is not None:
            self.stats.max_epsilon = max(self.stats.max_epsilon, update.epsilon)
        new_version: int | None = None
        if new is not None:
            new_version = self._advance(new)
        elif self.mode == "sync":
            self._waiting.discard(aid)
            new_version = self._maybe_finish_round()
        kept = self.receipts.setdefault(aid, {})
        kept[seq] = (self.version, self.stats.accepted)
        if update.oldest_pending is not None and update.oldest_pending > self.floors.get(aid, 0):
            self.floors[aid] = update.oldest_pending
            for old in [q for q in kept if q < update.oldest_pending]:
                del kept[old]  # receipted: the agent will not send it again
        if len(kept) > RECEIPTS_KEPT:
            del kept[min(kept)]
        return Accepted(aid, seq, update.base_version, staleness, new_version, self.stats.accepted)

    def receipt_for(self, agent_id: str, seq: int) -> tuple[int, int] | None:
        """``(version, index)`` recorded when ``(agent_id, seq)`` was accepted, if it was (and is still kept)."""
        return self.receipts.get(agent_id, {}).get(seq)

    def reject(self, rejected: Rejected) -> Rejected:
        """Count a rejection (also one found before the core, e.g. by the decoder) and return it."""
        self.stats.rejected[rejected.reason.value] += 1
        return rejected

    def _validate(self, u: UpdateMessage, topic_agent_id: str | None) -> Rejected | None:
        def rej(reason: RejectReason, detail: str) -> Rejected:
            return Rejected(u.agent_id, u.seq, reason, detail)

        if topic_agent_id is not None and u.agent_id != topic_agent_id:
            return rej(
                RejectReason.AGENT_ID_MISMATCH,
                f"update names agent {u.agent_id!r} but came on the topic of {topic_agent_id!r}",
            )
        kept = self.receipts.get(u.agent_id)
        if kept and u.seq in kept:
            return rej(RejectReason.DUPLICATE, f"seq {u.seq} was accepted before")
        floor = self.floors.get(u.agent_id, 0)
        if u.seq < floor:
            return rej(RejectReason.DUPLICATE, f"seq {u.seq} is below the agent's receipted floor {floor}")
        if kept and len(kept) >= RECEIPTS_KEPT and u.seq < min(kept):
            return rej(RejectReason.DUPLICATE, f"seq {u.seq} is older than the {RECEIPTS_KEPT} remembered")
        if u.base_version > self.version:
            return rej(
                RejectReason.UNKNOWN_BASE_VERSION,
                f"base version {u.base_version} is ahead of the current {self.version}",
            )
        staleness = self.version - u.base_version
        if staleness > self.max_staleness:
            return rej(RejectReason.TOO_STALE, f"staleness {staleness} > max {self.max_staleness}")
        if self.rule.needs_history and u.base_version not in self._history:
            return rej(RejectReason.UNKNOWN_BASE_VERSION, f"base version {u.base_version} is not kept")
        if self.mode == "sync" and u.agent_id not in self._waiting:
            return rej(RejectReason.NOT_SELECTED, f"agent not awaited in the round at version {self.version}")
        if u.delta.keys() != self._weights.keys():
            return rej(
                RejectReason.MODEL_MISMATCH,
                f"tensor names {sorted(u.delta)[:8]} differ from the model's {sorted(self._weights)[:8]}",
            )
        for k, ref in self._weights.items():
            d = u.delta[k]
            if d.shape != ref.shape or d.dtype != ref.dtype:
                return rej(
                    RejectReason.MODEL_MISMATCH,
                    f"tensor {k!r} is {d.dtype}{list(d.shape)}, model has {ref.dtype}{list(ref.shape)}",
                )
        if self.norm_window is not None:
            low, high = self.norm_window
            norm = float(l2_norms([u.delta])[0])
            if not low <= norm <= high:
                return rej(
                    RejectReason.NOT_PRIVATE,
                    f"L2 norm {norm:.4g} outside [{low:.4g}, {high:.4g}] for the agreed DP noise",
                )
        return None

    def _maybe_finish_round(self) -> int | None:
        assert isinstance(self.rule, SyncFedAvgRule)
        if self._waiting:
            return None
        if not self.rule.received:
            self.selected = None
            return None
        return self._advance(self.rule.finish(self._weights))

    def _advance(self, new: Tensors) -> int:
        self._weights = _frozen(new)
        self.version += 1
        if self.rule.needs_history:
            self._history[self.version] = new
            for v in [v for v in self._history if v < self.version - self.max_staleness]:
                del self._history[v]
        if self.mode == "sync":
            self.selected = None
            self._waiting = set()
        return self.version

    # --- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: model, version, rule state, dedupe state, stats."""
        return {
            "version": self.version,
            "weights": self._weights,
            "rule": self.rule.name,
            "rule_state": self.rule.state_dict(),
            "last_seq": dict(self.last_seq),
            "receipts": {a: [[q, v, i] for q, (v, i) in kept.items()] for a, kept in self.receipts.items()},
            "floors": dict(self.floors),
            "stats": self.stats.to_dict(),
            "history": {str(v): w for v, w in self._history.items() if v != self.version},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; raises ValueError if it belongs to another rule or model."""
        if state["rule"] != self.rule.name:
            raise ValueError(f"checkpoint is for rule {state['rule']!r}, this aggregator runs {self.rule.name!r}")
        weights = state["weights"]
        if weights.keys() != self._weights.keys() or any(weights[k].shape != v.shape for k, v in self._weights.items()):
            raise ValueError("checkpoint model does not match the configured model")
        self.version = int(state["version"])
        self._weights = _frozen({k: np.array(v) for k, v in weights.items()})
        self.rule.load_state_dict(state["rule_state"])
        self.last_seq = {str(k): int(v) for k, v in state["last_seq"].items()}
        self.receipts = {
            str(a): {int(q): (int(v), int(i)) for q, v, i in kept} for a, kept in state.get("receipts", {}).items()
        }
        self.floors = {str(a): int(f) for a, f in state.get("floors", {}).items()}
        self.stats = Stats.from_dict(state["stats"])
        if self.rule.needs_history:
            self._history = {int(v): w for v, w in state["history"].items()}
            self._history[self.version] = self._weights


def _frozen(tensors: Tensors) -> Tensors:
    """Mark ``tensors`` read-only (in place) and return them: published versions never change."""
    for arr in tensors.values():
        arr.flags.writeable = False
    return tensors


def make_rule(
    name: str,
    *,
    staleness_fn: StalenessFn,
    alpha: float = 0.6,
    buffer_size: int = 10,
    server_lr: float = 1.0,
    momentum: float = 0.0,
    aggregate: Aggregate | None = None,
    max_norm: float | None = None,
) -> Rule:
    """Build a rule by its config name (``fedasync``, ``fedbuff``, ``fedavg``).

    Buffered rules reduce their buffer with ``aggregate`` (default: weighted mean); FedAsync
    has no buffer, so only a fixed norm bound ``max_norm`` applies to it.
    """
    if name == "fedasync":
        if aggregate is not None:
            raise ValueError("FedAsync has no buffer to aggregate robustly; use fedbuff or fedavg")
        return FedAsyncRule(alpha, staleness_fn, max_norm=max_norm)
    if name == "fedbuff":
        return FedBuffRule(buffer_size, staleness_fn, server_lr=server_lr, momentum=momentum, aggregate=aggregate)
    if name == "fedavg":
        return SyncFedAvgRule(aggregate)
    raise ValueError(f"unknown rule {name!r}")
