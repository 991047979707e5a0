"""The cohort's neighbour graph and reconstruction threshold (SecAgg+, Bell et al., CCS 2020).

In SecAgg (Bonawitz et al., CCS 2017) every device masks with, and shares its secrets among,
all others: ``O(n^2)`` work. SecAgg+ replaces the complete graph with a sparse random one of
degree ``k = O(log n)``. Here the graph is a *ring* over an order the cohort id determines:
each device is adjacent to the ``k / 2`` devices before and after it. Every device computes the
graph itself from the roster and the cohort id, so the aggregator cannot give two devices
different views of it. Small cohorts (``n <= complete_up_to``) use the complete graph.

A device's secrets are shared among its **holders**: its neighbours and itself (``k + 1``).
The threshold ``t`` is the number of holders that must answer to reconstruct one secret; it
is more than half the holders, so that no aggregator can collect both a device's self-mask
seed and its mask key from honest holders (each answers for one of the two, never both).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass


def auto_degree(n: int, complete_up_to: int = 32) -> int:
    """Neighbours per device: all others up to ``complete_up_to`` devices, else an even ``>= 3 log2 n``."""
    if n <= complete_up_to:
        return n - 1
    k = math.ceil(3 * math.log2(n))
    return min(n - 1, k + (k % 2))


def threshold_for(holders: int, fraction: float) -> int:
    """``t = ceil(fraction * holders)``, at least a strict majority of the holders and at least 2."""
    if not 0.5 < fraction <= 1:
        raise ValueError(f"the threshold fraction must be in (0.5, 1], got {fraction}")
    return max(2, holders // 2 + 1, math.ceil(fraction * holders))


@dataclass(frozen=True)
class Graph:
    """Who masks with whom in one cohort."""

    members: tuple[str, ...]
    """Sorted device ids; a device's holder index is its place here, from 1."""
    neighbours: dict[str, frozenset[str]]

    def index(self, agent: str) -> int:
        """The Shamir x-coordinate of ``agent`` (1-based place in the roster)."""
        return self.members.index(agent) + 1

    def holders(self, agent: str) -> frozenset[str]:
        """Who holds shares of ``agent``'s secrets: its neighbours and itself."""
        return self.neighbours[agent] | {agent}


def build_graph(cohort: str, members: Sequence[str], degree: int) -> Graph:
    """The ring of ``degree`` over ``members``, ordered by SHA-256 of the cohort id and each id."""
    ids = tuple(sorted(set(members)))
    n = len(ids)
    if len(ids) != len(members):
        raise ValueError("a device appears twice in the roster")
    if not 1 <= degree <= n - 1 or (degree < n - 1 and degree % 2):
        raise ValueError(f"degree must be n - 1 or an even number in [2, n - 2]; n = {n}, got {degree}")
    if degree == n - 1:
        everyone = frozenset(ids)
        return Graph(ids, {a: everyone - {a} for a in ids})
    ring = sorted(ids, key=lambda a: hashlib.sha256(f"{cohort}\x00{a}".encode()).digest())
    half = degree // 2
    nbrs = {a: frozenset(ring[(i + d) % n] for d in range(-half, half + 1) if d) for i, a in enumerate(ring)}
    return Graph(ids, nbrs)
