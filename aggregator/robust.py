"""Buffer aggregators that compose: the plain weighted mean and robust wrappers around it.

A buffered rule (FedBuff, sync FedAvg) reduces its buffer of deltas with an
:class:`Aggregate`; robustness is added by wrapping, never by flags inside the rule::

    NormBounded(MultiKrum(f=2, m=6, inner=WeightedMean()))   # clip, select, then average

Each aggregate is a small callable over plain arrays (sans-IO) that counts what it did
(``counters``: deltas clipped, deltas excluded), so the service can publish it as metrics.
The math lives in :mod:`aggregator.rules.robust`.

**Claimed example counts.** FedBuff and FedAvg weight each delta by the number of examples
its device *claims* (Nguyen et al. 2022, McMahan et al. 2017), which a malicious device can
inflate: one claiming 2^62 examples outweighs every honest one. Robust aggregates therefore
declare ``trusts_claims = False`` and the rules then weight by staleness alone. This follows
the papers: Krum and Multi-Krum select and average the selected uniformly (Blanchard et al.,
NeurIPS 2017, Sec. 4), coordinate-wise median and trimmed mean have no weights (Yin et al.,
ICML 2018), and norm bounding is analysed for an unweighted mean (Sun et al. 2019). The
staleness weight ``s(t - tau) <= 1`` stays: it comes from the aggregator's own versions, and
a device can only lower its own by claiming an older base.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy.typing as npt

from aggregator.rules.fedavg import weighted_mean
from aggregator.rules.robust import (
    coordinate_median,
    multi_krum_select,
    norm_bound,
    trimmed_count,
    trimmed_mean,
)

Tensors = dict[str, npt.NDArray[Any]]
Deltas = Sequence[Mapping[str, npt.NDArray[Any]]]
ROBUST_RULES = ("none", "norm_bound", "median", "trimmed_mean", "krum")


class Aggregate(Protocol):
    """Reduce a buffer of deltas (with their rule weights) to one delta."""

    name: str
    counters: Counter[str]
    trusts_claims: bool
    """Whether the rule may weight deltas by the example counts devices claim (only the plain mean)."""

    def __call__(self, deltas: Deltas, weights: Sequence[float]) -> Tensors:
        """The aggregated delta."""
        ...


class WeightedMean:
    """``sum_i w_i delta_i / sum_i w_i``: FedBuff's and FedAvg's own reduction (not robust)."""

    name = "mean"
    trusts_claims = True

    def __init__(self) -> None:
        self.counters: Counter[str] = Counter()

    def __call__(self, deltas: Deltas, weights: Sequence[float]) -> Tensors:
        """Weighted mean in the tensors' dtype."""
        return weighted_mean(deltas, weights)


class NormBounded:
    """Clip each delta to L2 norm ``max_norm`` before ``inner`` (Sun et al. 2019).

    ``max_norm=None`` bounds adaptively by the median norm of the buffer, which needs no
    tuning and holds while fewer than half the buffered deltas are malicious.
    """

    trusts_claims = False

    def __init__(self, inner: Aggregate, max_norm: float | None = None) -> None:
        if max_norm is not None and not max_norm > 0:
            raise ValueError(f"max_norm must be > 0 or None (adaptive), got {max_norm}")
        self.inner = inner
        self.max_norm = max_norm
        self.name = f"norm_bound+{inner.name}" if inner.name != "mean" else "norm_bound"
        self.counters: Counter[str] = Counter()

    def __call__(self, deltas: Deltas, weights: Sequence[float]) -> Tensors:
        """Clip, then reduce with ``inner``."""
        clipped, n = norm_bound(deltas, self.max_norm)
        self.counters["clipped"] += n
        out = self.inner(clipped, weights)
        self.counters.update(self.inner.counters)
        self.inner.counters.clear()
        return out


class CoordinateMedian:
    """Per-coordinate median (Yin et al. 2018). Ignores the rule weights: a weight is a claim."""

    name = "median"
    trusts_claims = False

    def __init__(self) -> None:
        self.counters: Counter[str] = Counter()

    def __call__(self, deltas: Deltas, weights: Sequence[float]) -> Tensors:
        """The coordinate-wise median."""
        return coordinate_median(deltas)


class TrimmedMean:
    """Per-coordinate mean without the ``floor(beta * n)`` extremes at each end (Yin et al. 2018)."""

    trusts_claims = False

    def __init__(self, trim_fraction: float) -> None:
        trimmed_count(10, trim_fraction)  # validates the fraction
        self.trim_fraction = trim_fraction
        self.name = "trimmed_mean"
        self.counters: Counter[str] = Counter()

    def __call__(self, deltas: Deltas, weights: Sequence[float]) -> Tensors:
        """The coordinate-wise trimmed mean."""
        return trimmed_mean(deltas, self.trim_fraction)


class MultiKrum:
    """Keep the ``m`` deltas with the best Krum scores, then reduce them with ``inner`` (Blanchard et al. 2017)."""

    trusts_claims = False

    def __init__(self, f: int, m: int | None = None, inner: Aggregate | None = None) -> None:
        if f < 0:
            raise ValueError(f"f must be >= 0, got {f}")
        self.f = f
        self.m = m
        self.inner = inner or WeightedMean()
        self.name = "krum"
        self.counters: Counter[str] = Counter()

    def __call__(self, deltas: Deltas, weights: Sequence[float]) -> Tensors:
        """Select by Krum score, then average the selected with their (staleness) weights."""
        m = self.m if self.m is not None else len(deltas) - self.f
        keep = multi_krum_select(deltas, self.f, m)
        self.counters["excluded"] += len(deltas) - len(keep)
        return self.inner([deltas[i] for i in keep], [weights[i] for i in keep])


def build_aggregate(
    robust: str,
    *,
    norm_bound: float | None = None,
    trim_fraction: float = 0.2,
    krum_f: int = 1,
    krum_m: int | None = None,
) -> Aggregate:
    """The aggregate for a config: ``robust`` in :data:`ROBUST_RULES`.

    ``norm_bound`` (> 0: fixed, 0: adaptive median norm, None: off) puts norm bounding in
    front of the chosen rule; ``robust="norm_bound"`` is norm bounding before the mean.
    """
    inner: Aggregate
    if robust in ("none", "norm_bound"):
        inner = WeightedMean()
    elif robust == "median":
        inner = CoordinateMedian()
    elif robust == "trimmed_mean":
        inner = TrimmedMean(trim_fraction)
    elif robust == "krum":
        inner = MultiKrum(krum_f, krum_m)
    else:
        raise ValueError(f"robust rule must be one of {ROBUST_RULES}, got {robust!r}")
    if robust == "norm_bound" and norm_bound is None:
        norm_bound = 0.0
    if norm_bound is not None:
        return NormBounded(inner, norm_bound if norm_bound > 0 else None)
    return inner
