"""The sans-IO aggregation core: the versioned global model and every decision about it.

Everything that affects the global model, and every policy about who may change it how
often, lives here (the discipline of h11's ``_state.py``). The core takes decoded messages and
plain values, the current time included (``now``, seconds), and returns results that carry
**effects**: what the service must do, in order (log this input, send this receipt once it is
durable, publish the model, checkpoint now). It never awaits, sleeps, reads a clock or
touches a socket or a file; :mod:`aggregator.service` feeds it and carries the effects out.

Its inputs:

- :meth:`AggregatorCore.receive`: one decoded update, from the agent its topic names;
- :meth:`AggregatorCore.agent_status`: an agent's status (or heartbeat) arrived;
- :meth:`AggregatorCore.tick`: time passed (liveness expiry, sync-round timeouts);
- :meth:`AggregatorCore.replay`: a record of the write-ahead log, at start.

What it decides, for each update, in this order: identity (the topic's agent), duplicates
(a re-send gets its original receipt), the validation gate (names, shapes, dtypes, every
value finite, the L2 norm within ``max_update_norm``: on exactly the dense tensors the rule
will use), run and version (``wrong_run``, ``unknown_base_version``, ``too_stale``, sync
selection), the agreed DP noise (:class:`~aggregator.rules.noise.NoiseCheck`), the agent's
token bucket (``rate_limited``), one update per agent in each FedBuff buffer
(``agent_buffered``), and finally the rule, whose ``ValueError`` about the update rejects it
(``rule_refused``) and leaves its state as it was. The claimed example count is capped at
``max_num_examples``; robust aggregates ignore it (:mod:`aggregator.robust`).

State kept per agent is bounded (``max_agents``, least recently active first out); what it
costs is written in docs/reliability.md.
"""

from __future__ import annotations

import math
import random
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from aggregator.privacy import FederationLedger, Release
from aggregator.robust import Aggregate, WeightedMean
from aggregator.rules._checks import finite_result
from aggregator.rules.fedasync import fedasync_mix
from aggregator.rules.fedavg import fedavg_step
from aggregator.rules.fedbuff import fedbuff_step, staleness_weight
from aggregator.rules.noise import NoiseCheck
from aggregator.rules.robust import norm_bound
from fedmq.codec import detached
from fedmq.config import AggregatorConfig
from fedmq.errors import RETRYABLE, RejectReason
from fedmq.messages import ReceiptMessage, ReceiptStatus, UpdateMessage
from fedmq.secagg.ddp import DdgParams
from fedmq.secagg.messages import CheckIn, CohortMsg, DoneMsg, MaskedMsg, UpMessage
from fedmq.secagg.server import (
    Abandoned,
    CohortManager,
    Contribution,
    Formed,
    Reject,
    SendTo,
    Unmasked,
)
from fedmq.staleness import StalenessFn

Tensors = dict[str, npt.NDArray[Any]]
_DEFAULTS = AggregatorConfig()


# --- effects -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LogUpdate:
    """Append the update just received (its bytes, as they came) to the write-ahead log."""

    agent_id: str
    index: int
    now: float
    deferred: bool = False
    """Held for the next buffer: a replay must hold it too."""


@dataclass(frozen=True)
class LogEvent:
    """Append a core event (a sync round opened, lost an agent, or closed) to the write-ahead log."""

    event: Mapping[str, Any]
    now: float


@dataclass(frozen=True)
class SendReceipt:
    """Send ``receipt``; with ``durable``, only once everything logged before it is on disk."""

    receipt: ReceiptMessage
    durable: bool


@dataclass(frozen=True)
class PublishModel:
    """The model or the sync round's selection changed: publish it (once what made it is durable)."""

    version: int


@dataclass(frozen=True)
class CheckpointDue:
    """``checkpoint_every`` versions have passed since the last checkpoint."""

    version: int


@dataclass(frozen=True)
class AgentsOffline:
    """These agents were silent longer than ``agent_timeout`` and now count as offline."""

    agents: tuple[str, ...]


@dataclass(frozen=True)
class SendSecAgg:
    """Send a secure-aggregation message to one device; with ``durable``, once the log is on disk."""

    agent: str
    payload: bytes
    durable: bool = False


Effect = LogUpdate | LogEvent | SendReceipt | PublishModel | CheckpointDue | AgentsOffline | SendSecAgg


# --- results -------------------------------------------------------------------------------------
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
    effects: tuple[Effect, ...] = ()


@dataclass(frozen=True)
class Rejected:
    """An update was refused; the fault is the sender's. ``reason`` is counted in metrics."""

    agent_id: str | None
    seq: int | None
    reason: RejectReason
    detail: str
    retry_after: float | None = None
    """For a retryable reason (:data:`fedmq.errors.RETRYABLE`): when to send it again."""
    effects: tuple[Effect, ...] = ()
    resent: bool = False
    """A re-send of an update accepted before, answered with its original ``accepted`` receipt: an
    outbox doing its job after a lost receipt, counted in :attr:`Stats.duplicates`, nobody's fault."""


@dataclass
class Stats:
    """Counters the service publishes as metrics (checkpointed with the state)."""

    accepted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    """Final refusals by reason: the sender's fault."""
    retried: Counter[str] = field(default_factory=Counter)
    """``retry`` answers by reason (rate limit, buffer share): flow control, nobody's fault."""
    staleness_sum: int = 0
    max_epsilon: float = 0.0
    rounds_abandoned: int = 0
    """Sync rounds whose rule refused the updates received (e.g. too few for Krum at a timeout)."""
    held_dropped: int = 0
    """Held updates the rule refused when their buffer opened (the gate makes it impossible: counted)."""
    cohorts_applied: int = 0
    """Secure-aggregation cohorts whose sum made a FedBuff step."""
    cohorts_abandoned: int = 0
    """Secure-aggregation cohorts that ended without a sum (too few devices, or a restart)."""
    max_epsilon_reported: float = 0.0
    """The largest epsilon a device reported of itself. Under distributed DP a device charges each
    masked upload when it leaves (it cannot know whether a sum will include it), so this is at
    least :attr:`max_epsilon`, which counts the sums this aggregator released (its ledger)."""
    duplicates: int = 0
    """Re-sends of accepted updates, answered with their original receipt (not in :attr:`rejected`)."""
    site_sums: int = 0
    """Sites' sums accepted (each one of :attr:`accepted`)."""
    site_updates: int = 0
    """Device updates inside those sums."""
    site_weight_cut: int = 0
    """Sites' sums whose claimed weight was cut to ``contributions * max_num_examples``."""

    @property
    def mean_staleness(self) -> float:
        """Mean staleness of accepted updates (0 before the first one)."""
        return self.staleness_sum / self.accepted if self.accepted else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain-value form for checkpoints and metrics."""
        return {
            "accepted": self.accepted,
            "rejected": dict(self.rejected),
            "retried": dict(self.retried),
            "staleness_sum": self.staleness_sum,
            "max_epsilon": self.max_epsilon,
            "rounds_abandoned": self.rounds_abandoned,
            "held_dropped": self.held_dropped,
            "cohorts_applied": self.cohorts_applied,
            "cohorts_abandoned": self.cohorts_abandoned,
            "max_epsilon_reported": self.max_epsilon_reported,
            "duplicates": self.duplicates,
            "site_sums": self.site_sums,
            "site_updates": self.site_updates,
            "site_weight_cut": self.site_weight_cut,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Stats:
        """Inverse of :meth:`to_dict`."""
        return cls(
            int(d["accepted"]),
            Counter({str(k): int(v) for k, v in d["rejected"].items()}),
            Counter({str(k): int(v) for k, v in d.get("retried", {}).items()}),
            int(d["staleness_sum"]),
            float(d["max_epsilon"]),
            int(d.get("rounds_abandoned", 0)),
            int(d.get("held_dropped", 0)),
            int(d.get("cohorts_applied", 0)),
            int(d.get("cohorts_abandoned", 0)),
            float(d.get("max_epsilon_reported", d["max_epsilon"])),
            int(d.get("duplicates", 0)),
            int(d.get("site_sums", 0)),
            int(d.get("site_updates", 0)),
            int(d.get("site_weight_cut", 0)),
        )


# --- rules -----------------------------------------------------------------------------------------
class Rule(Protocol):
    """A stateful aggregation strategy that the core drives. Rules never see transport types.

    :meth:`add` is all-or-nothing: when it raises ``ValueError`` (about this update, or a step
    whose result would not be finite), the rule's state is as it was before the call.
    """

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

    def held(self, agent_id: str) -> int:
        """How many updates of ``agent_id`` wait in the rule (the open buffer or round)."""
        ...

    def open_slots(self) -> tuple[int, int]:
        """``(waiting, capacity)`` of the open buffer (``(0, 0)`` for a rule without one)."""
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
        clipped = 0
        if self.max_norm is not None:
            (bounded,), clipped = norm_bound([delta], self.max_norm)
            delta = bounded
        new = fedasync_mix(weights, base, delta, self.alpha * self.staleness_fn(staleness))
        finite_result(new, "the FedAsync mix")
        self.counters["clipped"] += clipped
        return new

    def held(self, agent_id: str) -> int:
        """FedAsync holds nothing between updates."""
        return 0

    def open_slots(self) -> tuple[int, int]:
        """No buffer."""
        return 0, 0

    def state_dict(self) -> dict[str, Any]:
        """FedAsync keeps no state beyond the model."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing to restore."""


@dataclass(frozen=True)
class Buffered:
    """One delta waiting in a FedBuff buffer or a sync round."""

    agent_id: str
    delta: Tensors
    weight: float
    count: int = 1
    """Updates it stands for: 1, or a site's sum of that many device updates."""


@dataclass(frozen=True)
class Deferred:
    """An accepted update held for the next FedBuff buffer (its agent already had one in the open one)."""

    agent_id: str
    delta: Tensors
    num_examples: int
    base_version: int


class FedBuffRule:
    """FedBuff (Nguyen et al. 2022): buffer ``K`` deltas weighted by ``n * s(staleness)``, then one server step.

    With a robust aggregate the weight is ``s(staleness)`` alone (claims are not trusted).
    """

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
        self.buffer: list[Buffered] = []
        self.velocity: Tensors | None = None
        self.last_step: tuple[str, ...] = ()
        """The agents whose deltas made the last step (a central-DP release charges them)."""

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
        """Buffer the delta; step when the buffer holds ``K`` (all-or-nothing)."""
        claimed = num_examples if self.aggregate.trusts_claims else 1
        return self._take(weights, Buffered(agent_id, delta, staleness_weight(claimed, self.staleness_fn(staleness))))

    def add_sum(
        self, weights: Tensors, mean: Tensors, *, staleness: int, weight: float, count: int, agent_id: str
    ) -> Tensors | None:
        """Buffer a site's sum of ``count`` updates: their weighted ``mean`` and their FedBuff ``weight``.

        It counts ``count`` towards ``K`` and weighs ``weight * s(staleness)``: the site took
        each device's staleness against its ``base_version``, this adds what passed since. The
        weighted mean over the buffer is then the one over the devices' own updates (exactly
        when ``staleness`` is 0, for the constant function always). Only the weighted mean
        takes sums: a robust aggregate judges single updates.
        """
        if not self.aggregate.trusts_claims:
            raise ValueError(f"the {type(self.aggregate).__name__} aggregate judges single updates, not a site's sum")
        if count < 1 or not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"a sum needs count >= 1 and a finite weight > 0, got {count}, {weight!r}")
        return self._take(weights, Buffered(agent_id, mean, weight * self.staleness_fn(staleness), count))

    def _take(self, weights: Tensors, entry: Buffered) -> Tensors | None:
        if sum(e.count for e in self.buffer) + entry.count < self.buffer_size:
            self.buffer.append(entry)
            return None
        full = [*self.buffer, entry]
        before = Counter(self.counters)
        try:
            new, velocity = fedbuff_step(
                weights,
                [e.delta for e in full],
                [e.weight for e in full],
                server_lr=self.server_lr,
                momentum=self.momentum,
                velocity=self.velocity,
                aggregate=self.aggregate,
            )
            finite_result(new, "the FedBuff step")
        except ValueError:
            self.counters.clear()
            self.counters.update(before)
            raise
        self.velocity = velocity
        self.last_step = tuple(e.agent_id for e in full)
        self.buffer.clear()
        return new

    def step_mean(self, weights: Tensors, mean: Tensors) -> Tensors:
        """One server step with a buffer's mean computed elsewhere (a secure-aggregation cohort's sum)."""
        new, velocity = fedbuff_step(
            weights, [mean], [1.0], server_lr=self.server_lr, momentum=self.momentum, velocity=self.velocity
        )
        finite_result(new, "the FedBuff step")
        self.velocity = velocity
        return new

    def held(self, agent_id: str) -> int:
        """How many deltas of ``agent_id`` are in the open buffer."""
        return sum(e.agent_id == agent_id for e in self.buffer)

    def open_slots(self) -> tuple[int, int]:
        """Updates waiting (a site's sum counts its updates), and the buffer size ``K``."""
        return sum(e.count for e in self.buffer), self.buffer_size

    def state_dict(self) -> dict[str, Any]:
        """The buffer, the momentum state, and the aggregate's own state if it has one (central DP's key)."""
        out: dict[str, Any] = {
            "buffer": [
                {"agent_id": e.agent_id, "delta": e.delta, "weight": e.weight, "count": e.count} for e in self.buffer
            ],
            "velocity": self.velocity,
        }
        if hasattr(self.aggregate, "state_dict"):
            out["aggregate"] = self.aggregate.state_dict()
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the buffer and the momentum state."""
        self.buffer = [
            Buffered(str(e.get("agent_id", "")), dict(e["delta"]), float(e["weight"]), int(e.get("count", 1)))
            for e in state["buffer"]
        ]
        self.velocity = dict(state["velocity"]) if state["velocity"] is not None else None
        if state.get("aggregate") is not None and hasattr(self.aggregate, "load_state_dict"):
            self.aggregate.load_state_dict(state["aggregate"])


class SyncFedAvgRule:
    """Synchronous FedAvg baseline: a round waits for every selected agent, then averages by example count."""

    name = "fedavg"
    needs_history = False
    mode = "sync"

    def __init__(self, aggregate: Aggregate | None = None) -> None:
        self.aggregate = aggregate or WeightedMean()
        self.counters = self.aggregate.counters
        self.received: list[Buffered] = []

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
        claimed = num_examples if self.aggregate.trusts_claims else 1
        self.received.append(Buffered(agent_id, delta, float(claimed)))
        return None

    def finish(self, weights: Tensors) -> Tensors:
        """Average the round's deltas into the model (the round is emptied, also when this raises)."""
        received, self.received = self.received, []
        new = fedavg_step(weights, [e.delta for e in received], [e.weight for e in received], aggregate=self.aggregate)
        return dict(finite_result(new, "the FedAvg round"))

    def held(self, agent_id: str) -> int:
        """How many updates of ``agent_id`` are in the open round (at most one: selection sees to it)."""
        return sum(e.agent_id == agent_id for e in self.received)

    def open_slots(self) -> tuple[int, int]:
        """A round is not a buffer: the selection decides."""
        return 0, 0

    def state_dict(self) -> dict[str, Any]:
        """The deltas received in the open round."""
        return {
            "received": [{"agent_id": e.agent_id, "delta": e.delta, "num_examples": e.weight} for e in self.received]
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the open round."""
        self.received = [
            Buffered(str(e.get("agent_id", "")), dict(e["delta"]), float(e["num_examples"])) for e in state["received"]
        ]


# --- per-agent state -------------------------------------------------------------------------------
RECEIPTS_KEPT = 4096
"""At most this many accepted ``seq -> (version, index)`` remembered per agent: the exactly-once window.

A seq in the window is a duplicate (answered with its original receipt); a seq not in it is
new, even if a higher one was accepted first (an outbox re-send after a reconnect can arrive
after a newer update). The agent tells, with each update, the oldest seq still waiting in its
outbox (``oldest_pending``); everything below it has its receipt and is forgotten, and a seq
below it is refused as a duplicate. The cap only matters for an agent that never advances it."""


@dataclass
class AgentRecord:
    """What the core remembers about one agent that had an update accepted (hard state: checkpointed)."""

    last_seq: int = 0
    receipts: dict[int, tuple[int, int]] = field(default_factory=dict)
    """Accepted ``seq -> (version after it, index)`` the agent may still re-send."""
    floor: int = 0
    """The highest ``oldest_pending`` it reported: seqs below are settled."""
    tokens: float = 0.0
    stamp: float = 0.0
    """The token bucket: ``tokens`` at time ``stamp``."""


def _bucket(rec: AgentRecord | None, now: float, rate: float, burst: float) -> float:
    """Tokens available at ``now`` (a new agent starts full; a clock that went back refills nothing)."""
    if rec is None:
        return burst
    return min(burst, rec.tokens + rate * max(0.0, now - rec.stamp))


class AggregatorCore:
    """The versioned global model and everything that may change it.

    Args:
        weights: initial global model (copied; float tensors).
        rule: the aggregation rule.
        max_staleness: updates more than this many versions behind are rejected.
        version: the version of ``weights`` (0 for a fresh model).
        run_id: the federation run; an update trained on another run is ``wrong_run``.
        sync_agents: in sync mode, agents per round (0: every online agent).
        round_timeout: sync mode: seconds a round waits before it closes with what it has.
        agent_timeout: seconds of silence after which an online agent counts as offline.
        seed: RNG seed for sync-round selection.
        noise_check: the agreed local DP noise (see :mod:`aggregator.rules.noise`); None: off.
        max_num_examples: cap on the example count a device claims.
        max_update_norm: larger L2 norms are ``out_of_range`` (aggregation could overflow).
        rate_limit: sustained updates per second per agent (0: no limit); ``rate_burst`` more at once.
        max_agents: agents remembered (hard and soft state each); least recently active go first.
        buffer_patience: seconds after which an open FedBuff buffer admits one more update per agent.
        checkpoint_every: versions between :class:`CheckpointDue` effects (0: never).
        secagg: the cohorts of secure aggregation (FedBuff only); with it, plain updates are
            refused and each cohort's sum makes one FedBuff step.
        ledger: every device's DP releases (central DP, or distributed DP in cohorts); the
            federation's epsilon in :attr:`Stats.max_epsilon` is its maximum. None: no ledger.
        central_dp: the noise multiplier of the rule's :class:`~aggregator.privacy.CentralGaussian`
            aggregate: each FedBuff step is a release for the agents in it.
        max_participation: the most releases one agent may be in (0: no cap); needs ``ledger``.
        min_separation: versions between two releases one agent is in (0: any); needs ``ledger``.
        sites: the site aggregators whose sums are taken (:attr:`UpdateMessage.weight`; FedBuff
            with the weighted mean only). A site is one infrastructure peer for many devices:
            no rate limit and no buffer share apply to it. The weight a sum claims is cut to
            what its updates could weigh, ``contributions * max_num_examples``.
        site_devices: how many devices a site has, for those whose number is known: a sum of
            more devices' updates is refused (``out_of_range``).
    """

    def __init__(
        self,
        weights: Mapping[str, npt.NDArray[Any]],
        rule: Rule,
        *,
        max_staleness: int = _DEFAULTS.max_staleness,
        version: int = 0,
        run_id: str | None = None,
        sync_agents: int = 0,
        round_timeout: float = _DEFAULTS.round_timeout,
        agent_timeout: float = _DEFAULTS.agent_timeout,
        seed: int = 0,
        noise_check: NoiseCheck | None = None,
        max_num_examples: int = _DEFAULTS.max_num_examples,
        max_update_norm: float = _DEFAULTS.max_update_norm,
        rate_limit: float = _DEFAULTS.rate_limit,
        rate_burst: float = _DEFAULTS.rate_burst,
        max_agents: int = _DEFAULTS.max_agents,
        buffer_patience: float = _DEFAULTS.buffer_patience,
        checkpoint_every: int = 0,
        secagg: CohortManager | None = None,
        ledger: FederationLedger | None = None,
        central_dp: float | None = None,
        max_participation: int = 0,
        min_separation: int = 0,
        sites: Iterable[str] = (),
        site_devices: Mapping[str, int] | None = None,
    ) -> None:
        if max_staleness < 0:
            raise ValueError("max_staleness must be >= 0")
        if not (max_num_examples >= 1 and max_update_norm > 0 and rate_limit >= 0 and rate_burst >= 1):
            raise ValueError("need max_num_examples >= 1, max_update_norm > 0, rate_limit >= 0, rate_burst >= 1")
        if max_agents < 1 or round_timeout < 0 or agent_timeout <= 0 or checkpoint_every < 0 or buffer_patience <= 0:
            raise ValueError(
                "need max_agents >= 1, round_timeout >= 0, agent_timeout > 0, checkpoint_every >= 0, "
                "buffer_patience > 0"
            )
        self.rule = rule
        self.max_staleness = 0 if rule.mode == "sync" else max_staleness
        self.version = version
        self.run_id = run_id
        self.noise_check = noise_check
        self.max_num_examples = max_num_examples
        self.max_update_norm = max_update_norm
        self.rate_limit, self.rate_burst = rate_limit, rate_burst
        self.max_agents = max_agents
        self.buffer_patience = buffer_patience
        self.sync_agents, self.round_timeout, self.agent_timeout = sync_agents, round_timeout, agent_timeout
        self.checkpoint_every = checkpoint_every
        self._weights: Tensors = _frozen({k: np.array(v) for k, v in weights.items()})
        self._history: dict[int, Tensors] = {version: self._weights} if rule.needs_history else {}
        self._agents: OrderedDict[str, AgentRecord] = OrderedDict()
        self._seen: OrderedDict[str, float] = OrderedDict()  # soft: last message time, for liveness
        self.online: set[str] = set()
        self.stats = Stats()
        self.selected: tuple[str, ...] | None = None
        self._waiting: set[str] = set()
        self._round_started = 0.0
        self._rng = random.Random(seed)
        self._last_checkpoint = version
        self._replaying = False
        self._recent: OrderedDict[str, float] = OrderedDict()  # soft: last accepted update per agent
        self._buffer_opened = 0.0  # soft: when the open buffer got its first delta
        self._deferred: list[Deferred] = []
        """Accepted, held for the next buffer, in order of acceptance (at most one per agent)."""
        if secagg is not None and not isinstance(rule, FedBuffRule):
            raise ValueError("secure aggregation runs one cohort per FedBuff buffer: use the fedbuff rule")
        self.secagg = secagg
        if (central_dp is not None or max_participation or min_separation) and ledger is None:
            raise ValueError("central DP and participation limits need a ledger")
        if central_dp is not None and not isinstance(rule, FedBuffRule):
            raise ValueError("central DP noises FedBuff's sum: use the fedbuff rule")
        self.ledger = ledger
        self.central_release: Release | None = ("gaussian", central_dp) if central_dp is not None else None
        self.max_participation = max_participation
        self.min_separation = min_separation
        self._open_cohorts: dict[str, tuple[str, ...]] = {}
        """Cohorts formed and not yet summed or abandoned (hard state: after a crash they are abandoned)."""
        self.sites = frozenset(sites)
        self.site_devices = dict(site_devices or {})
        if not (set(self.site_devices) <= self.sites and all(n >= 1 for n in self.site_devices.values())):
            raise ValueError(f"site_devices must give listed sites >= 1 devices, got {self.site_devices}")
        if self.sites and not (isinstance(rule, FedBuffRule) and rule.aggregate.trusts_claims):
            raise ValueError("sites' sums go into FedBuff's weighted mean: use the fedbuff rule, no robust aggregate")
        if self.sites and (secagg is not None or central_dp is not None or noise_check is not None):
            raise ValueError("sites' sums are not combined with secure aggregation, central DP or the noise check")

    # --- reading ---------------------------------------------------------------------------
    @property
    def weights(self) -> Tensors:
        """The current global model (read-only arrays)."""
        return self._weights

    @property
    def mode(self) -> str:
        """``"async"`` or ``"sync"``."""
        return self.rule.mode

    @property
    def known_agents(self) -> int:
        """Agents whose dedupe state is kept (at most ``max_agents``)."""
        return len(self._agents)

    @property
    def last_seq(self) -> dict[str, int]:
        """The highest accepted seq of each known agent (a snapshot)."""
        return {a: r.last_seq for a, r in self._agents.items()}

    @property
    def offline(self) -> int:
        """Agents heard from (still remembered) that are offline now."""
        return len(self._seen) - len(self.online)

    def agent(self, agent_id: str) -> AgentRecord | None:
        """What the core remembers about ``agent_id`` (None: nothing accepted, or forgotten)."""
        return self._agents.get(agent_id)

    def receipt_for(self, agent_id: str, seq: int) -> tuple[int, int] | None:
        """``(version, index)`` recorded when ``(agent_id, seq)`` was accepted, if it was (and is still kept)."""
        rec = self._agents.get(agent_id)
        return rec.receipts.get(seq) if rec is not None else None

    @property
    def round_open(self) -> bool:
        """Sync mode: the current round still waits for someone."""
        return bool(self._waiting)

    # --- agents ----------------------------------------------------------------------------
    def agent_status(self, agent_id: str, online: bool, *, now: float = 0.0) -> tuple[Effect, ...]:
        """An agent's status or heartbeat arrived: liveness, and in sync mode maybe a round."""
        effects: list[Effect] = []
        self._touch(agent_id, now, effects)
        if online:
            self.online.add(agent_id)
        elif agent_id in self.online:
            self.online.discard(agent_id)
            self._leave_round(agent_id, now, effects)
        if not online and self.secagg is not None:
            self._secagg_outputs(self.secagg.offline(agent_id, now), now, effects)
        self._maybe_start_round(now, effects)
        return tuple(effects)

    def tick(self, now: float) -> tuple[Effect, ...]:
        """Time passed: expire silent agents, time out a sync round, maybe open one."""
        effects: list[Effect] = []
        cutoff = now - self.agent_timeout
        silent = []
        for agent, seen in self._seen.items():  # oldest first: stop at the first recent one
            if seen >= cutoff:
                break
            if agent in self.online:
                silent.append(agent)
        for agent in silent:
            self.online.discard(agent)
            self._leave_round(agent, now, effects)
        if silent:
            effects.append(AgentsOffline(tuple(silent)))
        if self.selected is not None and self.round_timeout > 0 and now - self._round_started >= self.round_timeout:
            self._close_round(now, "timeout", effects)
        self._maybe_start_round(now, effects)
        if self.secagg is not None:
            for agent in silent:
                self._secagg_outputs(self.secagg.offline(agent, now), now, effects)
            self._secagg_outputs(self.secagg.tick(now, version=self.version, run=self.run_id), now, effects)
        return tuple(effects)

    def adopt_liveness(self, other: AggregatorCore) -> None:
        """Take over what ``other`` saw of the agents (soft state), e.g. after a rebuild from disk."""
        self.online, self._seen, self._recent = set(other.online), OrderedDict(other._seen), OrderedDict(other._recent)

    def _touch(self, agent_id: str, now: float, effects: list[Effect]) -> None:
        self._seen.pop(agent_id, None)
        self._seen[agent_id] = now
        while len(self._seen) > self.max_agents:
            gone, _ = self._seen.popitem(last=False)
            if gone in self.online:
                self.online.discard(gone)
                self._leave_round(gone, now, effects)

    # --- sync rounds -----------------------------------------------------------------------
    def _maybe_start_round(self, now: float, effects: list[Effect]) -> None:
        if self.mode != "sync" or self.selected is not None or self._replaying:
            return
        if len(self.online) < max(1, self.sync_agents):
            return
        pool = sorted(self.online)
        k = len(pool) if self.sync_agents == 0 else min(self.sync_agents, len(pool))
        selected = tuple(sorted(self._rng.sample(pool, k)))
        self._open_round(selected, now)
        effects += [LogEvent({"round": list(selected)}, now), PublishModel(self.version)]

    def _open_round(self, selected: tuple[str, ...], now: float) -> None:
        self.selected = selected
        self._waiting = set(selected)
        self._round_started = now

    def _leave_round(self, agent_id: str, now: float, effects: list[Effect]) -> None:
        if self.mode != "sync" or agent_id not in self._waiting:
            return
        self._waiting.discard(agent_id)
        effects.append(LogEvent({"leave": agent_id}, now))
        if not self._waiting:
            self._close_round(now, "everyone answered or left", effects)

    def _close_round(self, now: float, why: str, effects: list[Effect]) -> None:
        effects.append(LogEvent({"close": why}, now))
        self._finish_round(effects)

    def _finish_round(self, effects: list[Effect]) -> None:
        assert isinstance(self.rule, SyncFedAvgRule)
        self.selected, self._waiting = None, set()
        if not self.rule.received:
            return
        try:
            new = self.rule.finish(self._weights)
        except ValueError:
            self.stats.rounds_abandoned += 1  # e.g. a timeout left fewer updates than Krum needs
            effects.append(PublishModel(self.version))
            return
        self._advance(new, effects)

    # --- updates ---------------------------------------------------------------------------
    def receive(
        self, update: UpdateMessage, *, topic_agent_id: str | None = None, now: float = 0.0, deferred: bool = False
    ) -> Accepted | Rejected:
        """Decide about ``update``; the result carries the effects to carry out, in order.

        ``topic_agent_id`` is the agent id taken from the topic the update arrived on; an
        update whose own ``agent_id`` differs is rejected (spoofing). ``deferred`` is for
        :meth:`replay` only: the decision logged with the update.
        """
        aid, seq = update.agent_id, update.seq
        effects: list[Effect] = []
        if topic_agent_id is not None and not self._replaying:
            self._touch(topic_agent_id, now, effects)
        rejected, hold = self._admit(update, topic_agent_id, now)
        if rejected is not None:
            return self._refuse(rejected, effects, topic_agent_id)
        hold = deferred if self._replaying else hold
        staleness = self.version - update.base_version
        base = self._history.get(update.base_version) if self.rule.needs_history else None
        delta = detached(update.delta)  # a kept delta must not keep a larger payload alive
        claimed = min(update.num_examples, self.max_num_examples)
        new: Tensors | None = None
        weight_cut = False
        was_empty = self.rule.open_slots()[0] == 0
        if hold:  # waits for the next buffer: the agent has one in this one
            self._deferred.append(Deferred(aid, delta, claimed, update.base_version))
        else:
            try:
                if update.is_sum:
                    assert isinstance(self.rule, FedBuffRule)
                    assert update.weight is not None
                    count = update.contributions or 1
                    weight = min(update.weight, count * float(self.max_num_examples))  # s <= 1: n_i s_i <= max
                    weight_cut = weight < update.weight
                    new = self.rule.add_sum(
                        self._weights, delta, staleness=staleness, weight=weight, count=count, agent_id=aid
                    )
                else:
                    new = self.rule.add(
                        self._weights, base, delta, staleness=staleness, num_examples=claimed, agent_id=aid
                    )
            except ValueError as exc:
                refused = Rejected(aid, seq, RejectReason.RULE_REFUSED, str(exc)[:300])
                return self._refuse(refused, effects, topic_agent_id)
        self.stats.accepted += 1
        index = self.stats.accepted
        self.stats.staleness_sum += staleness
        if update.is_sum:
            self.stats.site_sums += 1
            self.stats.site_updates += update.contributions or 0
            self.stats.site_weight_cut += weight_cut
        if update.epsilon is not None:
            self._reported(update.epsilon)
        effects.append(LogUpdate(aid, index, now, deferred=hold))
        receipt_at = len(effects)
        rec = self._record(aid)
        if self.rate_limit > 0:
            rec.tokens, rec.stamp = max(0.0, _bucket(rec, now, self.rate_limit, self.rate_burst) - 1.0), now
        rec.last_seq = max(seq, rec.last_seq)
        self._recent.pop(aid, None)
        self._recent[aid] = now
        while len(self._recent) > self.max_agents:
            self._recent.popitem(last=False)
        if was_empty and self.rule.open_slots()[0] > 0:
            self._buffer_opened = now
        before = self.version
        if new is not None:
            self._advance(new, effects)
            self._take_deferred(effects)
            if self.rule.open_slots()[0]:  # the held updates opened the next buffer
                self._buffer_opened = now
        elif self.mode == "sync":
            self._waiting.discard(aid)
            if not self._waiting:
                self._finish_round(effects)
            self._maybe_start_round(now, effects)
        new_version = self.version if self.version != before else None
        rec.receipts[seq] = (self.version, index)
        if update.oldest_pending is not None and update.oldest_pending > rec.floor:
            rec.floor = update.oldest_pending
            for old in [q for q in rec.receipts if q < update.oldest_pending]:
                del rec.receipts[old]  # receipted: the agent will not send it again
        if len(rec.receipts) > RECEIPTS_KEPT:
            del rec.receipts[min(rec.receipts)]
        receipt = ReceiptMessage(aid, seq, "accepted", self.version, index=index, deferred=hold or None)
        effects.insert(receipt_at, SendReceipt(receipt, durable=True))
        return Accepted(aid, seq, update.base_version, staleness, new_version, index, tuple(effects))

    def _take_deferred(self, effects: list[Effect]) -> None:
        """After a step: the held updates go into the new buffer, in order (they may fill it, and more).

        Nothing here depends on time or liveness, so a replay repeats it exactly.
        """
        while self._deferred:
            d = self._deferred.pop(0)
            try:
                new = self.rule.add(
                    self._weights,
                    None,
                    d.delta,
                    staleness=self.version - d.base_version,
                    num_examples=d.num_examples,
                    agent_id=d.agent_id,
                )
            except ValueError:  # cannot happen for a delta the gate let in; counted, not fatal
                self.stats.held_dropped += 1
                continue
            if new is not None:
                self._advance(new, effects)

    def _refuse(self, rejected: Rejected, effects: list[Effect], sender: str | None) -> Rejected:
        """Count it and answer it on the receipt topic of ``sender``.

        That is the agent the topic names (the identity the broker authenticated), never the id
        the payload claims.
        """
        retry = rejected.reason in RETRYABLE
        aid, seq = sender or rejected.agent_id, rejected.seq
        original = None
        if aid is not None and seq is not None and rejected.reason is RejectReason.DUPLICATE:
            original = self.receipt_for(aid, seq)
        if original is not None:
            self.stats.duplicates += 1
        else:
            (self.stats.retried if retry else self.stats.rejected)[rejected.reason.value] += 1
        if aid is not None and seq is not None:
            if original is not None:  # a re-send of an accepted update: the same receipt again, once durable
                receipt = ReceiptMessage(aid, seq, "accepted", original[0], index=original[1])
                effects.append(SendReceipt(receipt, durable=True))
            else:
                status: ReceiptStatus = "retry" if retry else "rejected"
                receipt = ReceiptMessage(
                    aid,
                    seq,
                    status,
                    self.version,
                    rejected.reason.value,
                    retry_after=rejected.retry_after,
                    detail=rejected.detail[:200],
                )
                effects.append(SendReceipt(receipt, durable=False))
        return Rejected(
            aid,
            seq,
            rejected.reason,
            rejected.detail,
            rejected.retry_after,
            tuple(effects),
            resent=original is not None,
        )

    def refuse_undecodable(self, rejected: Rejected) -> Rejected:
        """An update the decoder refused, whose sender (the topic) and seq are known: counted and answered.

        A damaged copy of an accepted update (``duplicate``) gets its original receipt again.
        """
        return self._refuse(rejected, [], rejected.agent_id)

    def reject(self, rejected: Rejected) -> Rejected:
        """Count a rejection found before the core (by the decoder, or on the topic); nothing to answer."""
        self.stats.rejected[rejected.reason.value] += 1
        return rejected

    def _record(self, agent_id: str) -> AgentRecord:
        rec = self._agents.pop(agent_id, None) or AgentRecord(tokens=self.rate_burst)
        self._agents[agent_id] = rec  # most recently active last
        while len(self._agents) > self.max_agents:
            self._agents.popitem(last=False)
        return rec

    def _admit(self, u: UpdateMessage, topic_agent_id: str | None, now: float) -> tuple[Rejected | None, bool]:
        """The checks, in order: ``(None, hold)`` when the update is taken, ``hold`` for the next buffer."""

        def rej(reason: RejectReason, detail: str, retry_after: float | None = None) -> tuple[Rejected, bool]:
            return Rejected(u.agent_id, u.seq, reason, detail, retry_after), False

        if topic_agent_id is not None and u.agent_id != topic_agent_id:
            return rej(
                RejectReason.AGENT_ID_MISMATCH,
                f"update names agent {u.agent_id!r} but came on the topic of {topic_agent_id!r}",
            )
        if u.is_sum and u.agent_id not in self.sites and not self._replaying:
            return rej(
                RejectReason.NOT_A_SITE,
                f"a sum of {u.contributions} updates from {u.agent_id!r}, which aggregator.sites does not list",
            )
        has = self.site_devices.get(u.agent_id) if u.is_sum and not self._replaying else None
        if has is not None and u.contributions is not None and u.contributions > has:
            return rej(
                RejectReason.OUT_OF_RANGE,
                f"a sum of {u.contributions} devices' updates from {u.agent_id!r}, which has {has} (aggregator.sites)",
            )
        if self.secagg is not None and not self._replaying:
            return rej(
                RejectReason.SECURE_AGGREGATION_REQUIRED,
                "this aggregator takes only masked updates (secure aggregation); the update was not looked at",
            )
        rec = self._agents.get(u.agent_id)
        if rec is not None:
            if u.seq in rec.receipts:
                return rej(RejectReason.DUPLICATE, f"seq {u.seq} was accepted before")
            if u.seq < rec.floor:
                return rej(RejectReason.DUPLICATE, f"seq {u.seq} is below the agent's receipted floor {rec.floor}")
            if len(rec.receipts) >= RECEIPTS_KEPT and u.seq < min(rec.receipts):
                return rej(RejectReason.DUPLICATE, f"seq {u.seq} is older than the {RECEIPTS_KEPT} remembered")
        if not self._replaying and self.rate_limit > 0 and not u.is_sum:
            available = _bucket(rec, now, self.rate_limit, self.rate_burst)
            if available < 1.0:
                wait = (1.0 - available) / self.rate_limit
                return rej(RejectReason.RATE_LIMITED, f"more than {self.rate_limit:g} updates/s", round(wait, 3))
        problem, norm = self._gate(u.delta)
        if problem is not None:
            return rej(*problem)
        if self.run_id is not None and u.base_run is not None and u.base_run != self.run_id:
            return rej(RejectReason.WRONG_RUN, f"trained on run {u.base_run}, this federation runs {self.run_id}")
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
        pending = self.rule.held(u.agent_id) + self._held_back(u.agent_id)
        refusal = None if self._replaying else self._participation(u.agent_id, pending=pending)
        if refusal is not None:  # (a replay applies what was admitted: a changed cap cannot refuse it)
            return rej(*refusal, 1.0 if refusal[0] is RejectReason.PARTICIPATION_WINDOW else None)
        if self.mode == "sync" and u.agent_id not in self._waiting:
            return rej(RejectReason.NOT_SELECTED, f"agent not awaited in the round at version {self.version}")
        if self.noise_check is not None and not self._replaying:
            why = self.noise_check(u.delta, norm)
            if why is not None:
                return rej(RejectReason.NOT_PRIVATE, why)
        if self.mode == "async" and not self._replaying and not u.is_sum:
            waiting, capacity = self.rule.open_slots()
            if capacity and waiting:
                age = max(0.0, now - self._buffer_opened)
                share = max(self._buffer_share(capacity, now), 1 + int(age // self.buffer_patience))
                if self.rule.held(u.agent_id) >= share:
                    if not any(d.agent_id == u.agent_id for d in self._deferred):
                        return None, True  # its share is taken: it waits here for the next buffer
                    # A third one: when the buffer will have flushed (its fill rate so far), at most 1 s.
                    eta = min(age / waiting * (capacity - waiting), self.buffer_patience - age % self.buffer_patience)
                    return rej(
                        RejectReason.AGENT_BUFFERED,
                        f"this agent has {share} update(s) in the open buffer of {capacity} and one waiting",
                        round(min(max(eta, 0.05), 1.0), 3),
                    )
        return None, False

    def _buffer_share(self, capacity: int, now: float) -> int:
        """Updates one agent may have in a buffer of ``capacity``: one, while that many agents are active.

        With fewer agents active (sent an update or a status within ``agent_timeout``) than the
        buffer holds, one each could never fill it: then each agent's fair share,
        ``ceil(capacity / active)``. And a buffer open longer than ``buffer_patience`` seconds
        (active agents that went quiet) admits one more per agent for each such period, so it
        always fills. Admission decisions may use liveness and time: a replay of the log applies
        what was admitted and does not ask again.
        """
        cutoff = now - self.agent_timeout
        while self._recent and next(iter(self._recent.values())) < cutoff:
            self._recent.popitem(last=False)
        active = max(len(self.online), len(self._recent), 1)
        return max(1, math.ceil(capacity / active)) if capacity > active else 1

    def _gate(self, delta: Mapping[str, npt.NDArray[Any]]) -> tuple[tuple[RejectReason, str] | None, float]:
        """What the rule will use (see :func:`gate`)."""
        return gate(self._weights, delta, self.max_update_norm)

    def _participation(self, agent: str, pending: int = 0) -> tuple[RejectReason, str] | None:
        """Why ``agent`` (with ``pending`` updates not yet released) may not join another sum now, if so.

        The ledger decides (:meth:`FederationLedger.refusal`), for the sites as for this core.
        """
        if self.ledger is None:
            return None
        return self.ledger.refusal(
            agent,
            version=self.version,
            max_participation=self.max_participation,
            min_separation=self.min_separation,
            pending=pending,
        )

    def _held_back(self, agent: str) -> int:
        return sum(d.agent_id == agent for d in self._deferred)

    def _reported(self, epsilon: float) -> None:
        """A device's own epsilon: the federation's epsilon when no ledger counts releases here."""
        self.stats.max_epsilon_reported = max(self.stats.max_epsilon_reported, epsilon)
        if self.ledger is None:
            self.stats.max_epsilon = max(self.stats.max_epsilon, epsilon)

    def _charge(self, agents: Sequence[str], release: Release | None) -> None:
        """A noised sum that included ``agents`` was released: their ledgers, and the federation's epsilon."""
        if self.ledger is None or release is None or not agents:
            return
        self.ledger.record(agents, release, self.version + 1)  # the version this sum makes
        self.stats.max_epsilon = max(self.stats.max_epsilon, self.ledger.max_epsilon)

    def _advance(self, new: Tensors, effects: list[Effect]) -> int:
        if self.central_release is not None and isinstance(self.rule, FedBuffRule):
            self._charge(self.rule.last_step, self.central_release)
        self._weights = _frozen(dict(new))
        self.version += 1
        if self.rule.needs_history:
            self._history[self.version] = self._weights
            for v in [v for v in self._history if v < self.version - self.max_staleness]:
                del self._history[v]
        effects.append(PublishModel(self.version))
        if (
            self.checkpoint_every
            and not self._replaying
            and self.version - self._last_checkpoint >= self.checkpoint_every
        ):
            effects.append(CheckpointDue(self.version))
        return self.version

    # --- secure aggregation ------------------------------------------------------------------
    def secagg_message(self, agent: str, msg: UpMessage, *, now: float) -> tuple[list[Rejected], tuple[Effect, ...]]:
        """A device's secure-aggregation message (from the topic of ``agent``): what was refused, and the effects.

        A check-in joins the pool (and may form a cohort); the rest go to the device's cohort. A
        masked upload is admitted like a plain update first (a duplicate of an applied one gets
        its receipt again; a base version unknown or too stale is refused) and is then the
        cohort's. When a cohort's masks come off, its sum makes one FedBuff step.
        """
        effects: list[Effect] = []
        assert self.secagg is not None, "secure aggregation is off"
        self._touch(agent, now, effects)
        refusal = self._participation(agent) if isinstance(msg, CheckIn) else None
        if refusal is not None:  # not in the pool: a capped device is done, a separated one checks in again
            reason, detail = refusal
            (self.stats.retried if reason in RETRYABLE else self.stats.rejected)[reason.value] += 1
            return [Rejected(agent, None, reason, f"{agent!r} {detail}")], tuple(effects)
        if isinstance(msg, CheckIn):
            outs = self.secagg.check_in(agent, msg, now, version=self.version, run=self.run_id)
        else:
            outs = self.secagg.receive(agent, msg, now, check=self._admit_masked)
        resent = None
        if isinstance(msg, MaskedMsg):
            original = self.receipt_for(agent, msg.seq)
            if original is not None:  # as for a plain re-send: its receipt again, counted as a duplicate
                receipt = ReceiptMessage(agent, msg.seq, "accepted", original[0], index=original[1])
                effects.append(SendReceipt(receipt, durable=True))
                resent = agent
        refused = self._secagg_outputs(outs, now, effects, resent=resent)
        if not isinstance(msg, CheckIn):  # a cohort may have ended: its devices are back in the pool
            refused += self._secagg_outputs(self.secagg.form(now, version=self.version, run=self.run_id), now, effects)
        return refused, tuple(effects)

    def _admit_masked(self, agent: str, msg: MaskedMsg) -> Reject | None:
        rec = self._agents.get(agent)
        if rec is not None and (msg.seq in rec.receipts or msg.seq < rec.floor):
            return Reject(agent, RejectReason.DUPLICATE, f"seq {msg.seq} was applied before")
        refusal = self._participation(agent)  # checked at check-in too; this holds whatever put it in a cohort
        if refusal is not None:
            return Reject(agent, refusal[0], f"{agent!r} {refusal[1]}")
        if msg.agent_id != agent:
            return Reject(agent, RejectReason.AGENT_ID_MISMATCH, f"the upload names {msg.agent_id!r}")
        if msg.base_version > self.version:
            return Reject(agent, RejectReason.UNKNOWN_BASE_VERSION, f"base version {msg.base_version} > {self.version}")
        if self.version - msg.base_version > self.max_staleness:
            staleness = self.version - msg.base_version
            return Reject(agent, RejectReason.TOO_STALE, f"staleness {staleness} > max {self.max_staleness}")
        return None

    def _secagg_outputs(
        self, outs: list[Any], now: float, effects: list[Effect], *, resent: str | None = None
    ) -> list[Rejected]:
        """Carry the cohort manager's outputs into effects and counters; the refusals, for logging.

        ``resent``: the agent whose masked upload repeats an update applied before (its receipt
        went out again): its duplicate refusal is counted in :attr:`Stats.duplicates`.
        """
        refused: list[Rejected] = []
        for o in outs:
            if isinstance(o, SendTo):
                # A cohort's announcement waits for its sa_open record to be durable: a device
                # then never hears of a cohort that a restart cannot abandon (settle_restart).
                effects.append(SendSecAgg(o.agent, o.message.to_bytes(), durable=isinstance(o.message, CohortMsg)))
            elif isinstance(o, Reject):
                repeat = o.reason is RejectReason.DUPLICATE and o.agent == resent
                if repeat:
                    self.stats.duplicates += 1
                else:
                    (self.stats.retried if o.reason in RETRYABLE else self.stats.rejected)[o.reason.value] += 1
                refused.append(Rejected(o.agent, None, o.reason, o.detail, resent=repeat))
            elif isinstance(o, Formed):
                self._open_cohorts[o.cohort] = o.members
                effects.append(LogEvent({"sa_open": o.cohort, "members": list(o.members)}, now))
            elif isinstance(o, Abandoned):
                self._open_cohorts.pop(o.cohort, None)
                self.stats.cohorts_abandoned += 1
                effects.append(LogEvent({"sa_close": o.cohort, "reason": o.reason[:200]}, now))
            elif isinstance(o, Unmasked):
                self._apply_cohort(o, now, effects)
        return refused

    def _apply_cohort(self, u: Unmasked, now: float, effects: list[Effect]) -> None:
        """``mean = sum(w delta) / sum(w)`` into one FedBuff step, logged as that mean; a receipt per contributor.

        Under distributed DP the weights' sum is noised like the rest, and dividing by a noisy
        sum would scale the step by noise: the mean divides by the number of uploads instead
        (public: the aggregator received them), the fixed denominator of DP-FedAvg.
        """
        weight = float(u.values[-1]) if u.release is None else float(len(u.contributors))
        mean: Tensors = {}
        offset = 0
        for k in sorted(self._weights):
            ref = self._weights[k]
            mean[k] = (u.values[offset : offset + ref.size] / weight).reshape(ref.shape).astype(ref.dtype)
            offset += ref.size
        self._step_cohort(u.cohort, mean, weight, u.contributors, u.members, now, effects, u.release)

    def _step_cohort(
        self,
        cohort: str,
        mean: Tensors,
        weight: float,
        contributors: tuple[Contribution, ...],
        members: tuple[str, ...],
        now: float,
        effects: list[Effect],
        release: DdgParams | None = None,
    ) -> None:
        assert isinstance(self.rule, FedBuffRule)
        try:
            new = self.rule.step_mean(self._weights, mean)
        except ValueError as exc:  # the sum was checked in range: counted, nothing applied
            self._open_cohorts.pop(cohort, None)
            self.stats.cohorts_abandoned += 1
            effects.append(LogEvent({"sa_close": cohort, "reason": f"the step failed: {exc}"[:200]}, now))
            if not self._replaying:
                done = DoneMsg(cohort, "abandoned", self.version, "the sum could not be applied")
                effects += [SendSecAgg(a, done.to_bytes()) for a in members]
            return
        event = {
            "sa_apply": cohort,
            "mean": {k: v.tobytes() for k, v in mean.items()},
            "weight": weight,
            "contributors": [[c.agent, c.seq, c.base_version, c.epsilon] for c in contributors],
            "members": list(members),
        }
        if release is not None:
            event["release"] = dict(release.__dict__)
        effects.append(LogEvent(event, now))
        self._open_cohorts.pop(cohort, None)
        base = self.version
        self._charge([c.agent for c in contributors], release)
        if self.secagg is not None and self.ledger is not None:
            for c in contributors:  # spent, or too recently in a sum: out of the pool the cohort put them in
                if self._participation(c.agent) is not None:
                    self.secagg.leave(c.agent)
        self._advance(new, effects)
        self.stats.cohorts_applied += 1
        for c in contributors:
            self.stats.accepted += 1
            index = self.stats.accepted
            self.stats.staleness_sum += base - c.base_version
            if c.epsilon is not None:
                self._reported(c.epsilon)
            rec = self._record(c.agent)
            rec.last_seq = max(rec.last_seq, c.seq)
            rec.receipts[c.seq] = (self.version, index)
            if len(rec.receipts) > RECEIPTS_KEPT:
                del rec.receipts[min(rec.receipts)]
            receipt = ReceiptMessage(c.agent, c.seq, "accepted", self.version, index=index)
            effects.append(SendReceipt(receipt, durable=True))
        summed = {c.agent for c in contributors}  # their receipts tell them; the others learn it here
        for a in members:
            if a not in summed:
                done = DoneMsg(cohort, "applied", self.version, included=False)
                effects.append(SendSecAgg(a, done.to_bytes(), durable=True))

    def _replay_cohort(self, event: Mapping[str, Any], now: float) -> None:
        if "sa_open" in event:
            self._open_cohorts[str(event["sa_open"])] = tuple(str(a) for a in event["members"])
            return
        if "sa_close" in event:
            self._open_cohorts.pop(str(event["sa_close"]), None)
            self.stats.cohorts_abandoned += 1
            return
        raw = event["mean"]
        mean = {
            k: np.frombuffer(bytes(raw[k]), dtype=ref.dtype).reshape(ref.shape).copy()
            for k, ref in self._weights.items()
        }
        contributors = tuple(
            Contribution(str(a), int(q), int(b), float(e) if e is not None else None)
            for a, q, b, e in event["contributors"]
        )
        release = DdgParams(**dict(event["release"])) if event.get("release") is not None else None
        self._step_cohort(
            str(event["sa_apply"]),
            mean,
            float(event["weight"]),
            contributors,
            tuple(event.get("members", ())),
            now,
            [],
            release,
        )

    def abandon_open_cohorts(self, now: float, why: str) -> tuple[Effect, ...]:
        """After a restart: the cohorts that were in flight are over (their devices are told, and check in again)."""
        effects: list[Effect] = []
        for cohort, members in sorted(self._open_cohorts.items()):
            self.stats.cohorts_abandoned += 1
            effects.append(LogEvent({"sa_close": cohort, "reason": why}, now))
            done = DoneMsg(cohort, "abandoned", self.version, why).to_bytes()
            effects += [SendSecAgg(a, done) for a in members]
        self._open_cohorts.clear()
        return tuple(effects)

    @property
    def open_cohorts(self) -> dict[str, tuple[str, ...]]:
        """Cohorts formed and not yet summed or abandoned."""
        return dict(self._open_cohorts)

    def checkpoint_written(self, version: int) -> None:
        """The service wrote a checkpoint of ``version``."""
        self._last_checkpoint = version

    # --- replay --------------------------------------------------------------------------------
    def replay(self, kind: str, *, update: UpdateMessage | None = None, agent_id: str = "",
               event: Mapping[str, Any] | None = None, now: float = 0.0,
               deferred: bool = False) -> Accepted | Rejected | None:  # fmt: skip
        """Feed one write-ahead log record back: the same decisions, without the admission policies.

        An update was admitted when it was logged (rate, buffer fairness, the DP check); here it
        is only applied, so that a changed setting cannot refuse what was receipted. Effects are
        not for carrying out.
        """
        self._replaying = True
        try:
            if kind == "update":
                assert update is not None
                return self.receive(update, topic_agent_id=agent_id, now=now, deferred=deferred)
            assert event is not None
            effects: list[Effect] = []
            if "round" in event:
                self._open_round(tuple(str(a) for a in event["round"]), now)
            elif "leave" in event:
                self._waiting.discard(str(event["leave"]))
            elif "close" in event:
                self._finish_round(effects)
            elif event.keys() & {"sa_open", "sa_close", "sa_apply"}:
                self._replay_cohort(event, now)
            else:
                raise ValueError(f"unknown core event {sorted(event)}")
            return None
        finally:
            self._replaying = False

    # --- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: model, version, rule state, agents, round, stats."""
        return {
            "version": self.version,
            "weights": self._weights,
            "rule": self.rule.name,
            "rule_state": self.rule.state_dict(),
            "deferred": [
                {"agent_id": d.agent_id, "delta": d.delta, "num_examples": d.num_examples, "base": d.base_version}
                for d in self._deferred
            ],
            "agents": [
                [a, r.last_seq, r.floor, r.tokens, r.stamp, [[q, v, i] for q, (v, i) in r.receipts.items()]]
                for a, r in self._agents.items()
            ],
            "round": {"selected": list(self.selected), "waiting": sorted(self._waiting), "started": self._round_started}
            if self.selected is not None
            else None,
            "stats": self.stats.to_dict(),
            "history": {str(v): w for v, w in self._history.items() if v != self.version},
            "cohorts": {c: list(m) for c, m in self._open_cohorts.items()},
            "privacy": self.ledger.state_dict() if self.ledger is not None else None,
        }

    def check_state(self) -> None:
        """Raise ValueError if anything that would be checkpointed is not finite (our bug, never a peer's)."""
        for name, tensors in self._state_tensors():
            finite_result(tensors, name)

    def _state_tensors(self) -> Iterator[tuple[str, Mapping[str, npt.NDArray[Any]]]]:
        yield "the model", self._weights
        rule_state = self.rule.state_dict()
        for key in ("buffer", "received"):
            for i, e in enumerate(rule_state.get(key, [])):
                yield f"{key}[{i}]", e["delta"]
        if rule_state.get("velocity") is not None:
            yield "the momentum", rule_state["velocity"]
        for i, d in enumerate(self._deferred):
            yield f"deferred[{i}]", d.delta
        for v, w in self._history.items():
            yield f"version {v}", w

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (also of the previous format); ValueError if it is another rule's or model's."""
        if state["rule"] != self.rule.name:
            raise ValueError(f"checkpoint is for rule {state['rule']!r}, this aggregator runs {self.rule.name!r}")
        weights = state["weights"]
        if weights.keys() != self._weights.keys() or any(weights[k].shape != v.shape for k, v in self._weights.items()):
            raise ValueError("checkpoint model does not match the configured model")
        finite_result(weights, "the checkpoint's model")
        self.version = int(state["version"])
        self._weights = _frozen({k: np.array(v) for k, v in weights.items()})
        self.rule.load_state_dict(state["rule_state"])
        self._deferred = [
            Deferred(str(d["agent_id"]), dict(d["delta"]), int(d["num_examples"]), int(d["base"]))
            for d in state.get("deferred", [])
        ]
        self._agents = OrderedDict()
        if "agents" in state:
            for a, last, floor, tokens, stamp, kept in state["agents"]:
                receipts = {int(q): (int(v), int(i)) for q, v, i in kept}
                self._agents[str(a)] = AgentRecord(int(last), receipts, int(floor), float(tokens), float(stamp))
        else:  # the format before per-agent records
            floors = state.get("floors", {})
            receipts_by_agent = state.get("receipts", {})
            for a, last in state["last_seq"].items():
                kept = {int(q): (int(v), int(i)) for q, v, i in receipts_by_agent.get(a, [])}
                self._agents[str(a)] = AgentRecord(int(last), kept, int(floors.get(a, 0)), self.rate_burst, 0.0)
        rnd = state.get("round")
        if rnd is not None:
            self.selected = tuple(str(a) for a in rnd["selected"])
            self._waiting = {str(a) for a in rnd["waiting"]}
            self._round_started = float(rnd["started"])
        self.stats = Stats.from_dict(state["stats"])
        self._open_cohorts = {str(c): tuple(str(a) for a in m) for c, m in state.get("cohorts", {}).items()}
        if self.ledger is not None and state.get("privacy") is not None:
            self.ledger.load_state_dict(state["privacy"])
        if self.rule.needs_history:
            self._history = {int(v): w for v, w in state["history"].items()}
            self._history[self.version] = self._weights
        self._last_checkpoint = self.version


def gate(
    reference: Mapping[str, npt.NDArray[Any]], delta: Mapping[str, npt.NDArray[Any]], max_norm: float
) -> tuple[tuple[RejectReason, str] | None, float]:
    """What a rule will use: the names, shapes and dtypes of ``reference``; finite; L2 norm at most ``max_norm``.

    Returns ``(why, norm)``: ``why`` is ``None`` for a delta that passes. One pass: ``x . x``
    per tensor is finite only if every value is finite and the norm does not overflow; only
    then is the exact element-wise check run to tell the two apart.
    """
    if delta.keys() != reference.keys():
        names = f"tensor names {sorted(delta)[:8]} differ from the model's {sorted(reference)[:8]}"
        return (RejectReason.MODEL_MISMATCH, names), 0.0
    sq = 0.0
    for k, ref in reference.items():
        d = delta[k]
        if d.shape != ref.shape or d.dtype != ref.dtype:
            what = f"tensor {k!r} is {d.dtype}{list(d.shape)}, model has {ref.dtype}{list(ref.shape)}"
            return (RejectReason.MODEL_MISMATCH, what), 0.0
        flat = d.reshape(-1)
        with np.errstate(over="ignore", invalid="ignore"):
            sq += float(np.dot(flat, flat))
    if not math.isfinite(sq):
        if any(not np.isfinite(v).all() for v in delta.values()):
            return (RejectReason.NON_FINITE, "contains NaN or Inf"), 0.0
        return (RejectReason.OUT_OF_RANGE, f"L2 norm overflows (limit {max_norm:g})"), 0.0
    norm = math.sqrt(sq)
    if norm > max_norm:
        return (RejectReason.OUT_OF_RANGE, f"L2 norm {norm:.4g} > {max_norm:g}"), norm
    return None, norm


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
