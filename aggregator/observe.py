"""What an operator sees of a running federation: the dashboard's state and the Prometheus metrics.

:class:`Observatory` is sans-IO: the service tells it what happened (an update accepted or
refused, a status, an evaluation) with the time, and it keeps a bounded picture of it: each
agent's last message, state, epsilon and budget; accuracy and loss over time; staleness and
ingest latency. :meth:`Observatory.snapshot` is the dashboard's JSON, and
:class:`PrometheusExport` renders the same figures in Prometheus' text format.

Counters come from the core's own statistics, read at scrape time, so that they continue across
restarts (they are checkpointed) and agree exactly with the ``metrics`` topic. The histograms
are this process's observations since it started.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter, OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

STALENESS_BUCKETS: tuple[float, ...] = (0, 1, 2, 3, 5, 8, 13, 20, 50, 100)
"""Upper bounds of the staleness histogram (model versions)."""
LATENCY_BUCKETS: tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
"""Upper bounds of the ingest-latency histogram (seconds from arrival to the core's decision)."""
MAX_AGENTS_SHOWN = 10_000
"""Agents the dashboard remembers; the least recently heard from is forgotten first."""
MAX_POINTS = 600
"""Evaluation points on the dashboard's chart (older ones are thinned out)."""


@dataclass
class AgentView:
    """One agent as the dashboard shows it."""

    last_seen: float
    state: str = "online"
    epsilon: float | None = None
    budget: float | None = None
    accepted: int = 0
    rejected: int = 0
    last_reason: str | None = None


@dataclass
class Histogram:
    """Cumulative bucket counts, as Prometheus defines them (``le`` upper bounds, then ``+Inf``)."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        """Count ``value`` (finite, >= 0) in its bucket."""
        if not math.isfinite(value) or value < 0:
            return
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.n += 1

    def cumulative(self) -> list[int]:
        """Counts at or below each bound, then the total (``+Inf``)."""
        out, running = [], 0
        for c in self.counts:
            running += c
            out.append(running)
        return out


class Observatory:
    """The dashboard's picture of the federation, fed by the service (no I/O, no clock of its own)."""

    def __init__(self, *, max_agents: int = MAX_AGENTS_SHOWN, max_points: int = MAX_POINTS) -> None:
        self.max_agents = max_agents
        self.max_points = max_points
        self.agents: OrderedDict[str, AgentView] = OrderedDict()
        self.points: list[tuple[float, int, float, float]] = []
        """``(elapsed seconds, version, accuracy, loss)`` of each evaluation."""
        self.staleness = Histogram(STALENESS_BUCKETS)
        self.latency = Histogram(LATENCY_BUCKETS)
        self.rejections: Counter[str] = Counter()
        """Refusals this process saw, by reason (the core's counters are the totals)."""

    def _agent(self, agent: str, now: float) -> AgentView:
        view = self.agents.pop(agent, None) or AgentView(last_seen=now)
        view.last_seen = now
        self.agents[agent] = view
        while len(self.agents) > self.max_agents:
            self.agents.popitem(last=False)
        return view

    def accepted(self, agent: str, *, staleness: int, latency: float, epsilon: float | None, now: float) -> None:
        """An update of ``agent`` was taken (``latency``: seconds from arrival to the decision)."""
        view = self._agent(agent, now)
        view.accepted += 1
        view.state = "online" if view.state == "offline" else view.state
        if epsilon is not None:
            view.epsilon = epsilon
        self.staleness.observe(staleness)
        self.latency.observe(latency)

    def rejected(self, agent: str | None, reason: str, *, now: float) -> None:
        """An update was refused for ``reason`` (``agent``: the topic's, when it names a valid one)."""
        self.rejections[reason] += 1
        if agent is not None:
            view = self._agent(agent, now)
            view.rejected += 1
            view.last_reason = reason

    def status(self, agent: str, state: str, *, epsilon: float | None, budget: float | None, now: float) -> None:
        """A status message (or its Will) of ``agent``."""
        view = self._agent(agent, now)
        view.state = state
        if epsilon is not None:
            view.epsilon = epsilon
        if budget is not None:
            view.budget = budget

    def evaluated(self, elapsed: float, version: int, accuracy: float, loss: float) -> None:
        """A model version's held-out accuracy and loss."""
        self.points.append((elapsed, version, accuracy, loss))
        if len(self.points) > self.max_points:  # keep the first and the newest, thin the rest
            self.points = [self.points[0], *self.points[2:-1:2], self.points[-1]]

    def snapshot(self, progress: Mapping[str, Any], *, online: Sequence[str], now: float) -> dict[str, Any]:
        """The dashboard's state: ``progress`` (the metrics topic's map) plus agents, series and histograms.

        ``online`` is the core's set of live agents (the authority on liveness: Wills and timeouts).
        """
        live = set(online)
        agents = [
            {
                "id": name,
                "online": name in live,
                "state": view.state if name in live or view.state in ("offline", "stopped") else "offline",
                "seconds_since_seen": round(max(0.0, now - view.last_seen), 1),
                "epsilon": view.epsilon,
                "budget": view.budget,
                "accepted": view.accepted,
                "rejected": view.rejected,
                "last_reason": view.last_reason,
            }
            for name, view in reversed(self.agents.items())
        ]
        return {
            "metrics": dict(progress),
            "agents": agents,
            "series": [{"t": t, "version": v, "accuracy": a, "loss": loss} for t, v, a, loss in self.points],
            "staleness": _histogram_json(self.staleness),
            "ingest_latency": _histogram_json(self.latency),
        }


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as ``None`` and numpy scalars as Python numbers (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _histogram_json(h: Histogram) -> dict[str, Any]:
    return {
        "bounds": list(h.bounds),
        "counts": list(h.counts),
        "count": h.n,
        "mean": h.total / h.n if h.n else 0.0,
    }


# --- Prometheus -----------------------------------------------------------------------------------


class PrometheusExport:
    """A prometheus_client collector over the service's figures, read at scrape time.

    Args:
        observatory: the histograms and per-agent epsilons.
        progress: returns the metrics-topic map (the core's checkpointed counters).
        prefix: the federation's topic prefix, the ``federation`` label of every sample.
    """

    def __init__(self, observatory: Observatory, progress: Any, prefix: str) -> None:
        from prometheus_client import CollectorRegistry

        self.observatory = observatory
        self.progress = progress
        self.federation = prefix
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def collect(self) -> Iterator[Any]:
        """The metric families (prometheus_client's collector protocol)."""
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        p: Mapping[str, Any] = self.progress()
        fed = self.federation
        for name, doc in (
            ("fedmq_updates_accepted", "Updates taken into the model"),
            ("fedmq_updates_duplicate", "Re-sends of accepted updates, answered with their receipt"),
        ):
            counter = CounterMetricFamily(name, doc, labels=["federation"])
            counter.add_metric([fed], float(p.get("accepted" if name.endswith("accepted") else "duplicates", 0)))
            yield counter
        by_label: tuple[tuple[str, str, str, Mapping[str, Any]], ...] = (
            ("fedmq_updates_rejected", "Updates refused, by reason (the sender's fault)", "reason",
             p["rejected_by_reason"]),
            ("fedmq_updates_retried", "Updates told to retry later (flow control), by reason", "reason",
             p["retried_by_reason"]),
            ("fedmq_messages_dropped", "Messages not taken: overload, receipt queue, state folder", "why",
             {why: p.get(f"dropped_{why}", 0) for why in ("overload", "receipts", "unsafe")}),
        )  # fmt: skip
        for name, doc, label, counts in by_label:
            labelled = CounterMetricFamily(name, doc, labels=["federation", label])
            for reason, n in sorted(counts.items()):
                labelled.add_metric([fed, reason], float(n))
            yield labelled
        for name, key, text in (
            ("fedmq_model_version", "version", "The newest global model version"),
            ("fedmq_agents_online", "agents_online", "Agents online (status, Will, timeout)"),
            ("fedmq_agents_offline", "agents_offline", "Agents heard from before that are offline now"),
            ("fedmq_max_epsilon", "max_epsilon", "The federation's epsilon: the largest over its devices"),
            ("fedmq_accuracy", "accuracy", "Held-out accuracy of the newest evaluated version"),
            ("fedmq_loss", "loss", "Held-out loss of the newest evaluated version"),
            ("fedmq_mean_staleness", "mean_staleness", "Mean staleness of accepted updates, since the run began"),
        ):
            value = p.get(key)
            gauge = GaugeMetricFamily(name, text, labels=["federation"])
            gauge.add_metric([fed], float(value) if value is not None else math.nan)
            yield gauge
        per_agent = GaugeMetricFamily(
            "fedmq_agent_epsilon", "Each device's own reported epsilon", labels=["federation", "agent"]
        )
        for agent, view in self.observatory.agents.items():
            if view.epsilon is not None and math.isfinite(view.epsilon):
                per_agent.add_metric([fed, agent], view.epsilon)
        yield per_agent
        for name, text, h in (
            ("fedmq_update_staleness", "Staleness of accepted updates (versions)", self.observatory.staleness),
            ("fedmq_ingest_latency_seconds", "Arrival to decision of an update", self.observatory.latency),
        ):
            family = HistogramMetricFamily(name, text, labels=["federation"])
            cumulative = h.cumulative()
            buckets = [(_le(b), float(c)) for b, c in zip(h.bounds, cumulative, strict=False)]
            buckets.append(("+Inf", float(cumulative[-1])))
            family.add_metric([fed], buckets, sum_value=h.total)
            yield family

    def render(self) -> tuple[bytes, str]:
        """The text exposition and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _le(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else repr(bound)
