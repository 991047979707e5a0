"""Accounting for the distributed discrete Gaussian under secure aggregation (the mechanism comes later).

Kairouz, Liu and Steinke, "The Distributed Discrete Gaussian Mechanism for Federated Learning
with Secure Aggregation", ICML 2021, arXiv:2102.06387. Each of ``n`` devices scales its clipped
update by ``1 / gamma``, rounds it to integers, and adds discrete Gaussian noise of variance
``sigma^2`` (integer units) before masking. The aggregator only sees the sum, which carries the
sum of ``n`` discrete Gaussians. That sum is close to, but not exactly, a discrete Gaussian of
variance ``n sigma^2``. Proposition 14 of the paper bounds its Renyi DP at order ``alpha``
(with ``s2 = Delta_2 / sqrt(n sigma^2)`` and ``s1 = Delta_1 / sqrt(n sigma^2)``):

    min( alpha/2 s2^2 + tau d,
         alpha/2 (s2^2 + 2 s1 tau + tau^2 d),
         alpha/2 (s2 + sqrt(d) tau)^2 ),   tau = 10 sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k / (k + 1))

``Delta_2`` and ``Delta_1`` are the L2 and L1 sensitivities after rounding. Conditional
randomized rounding keeps the L2 norm of a rounded vector within :func:`rounded_l2_bound`
(Section 4.1 of the paper).

``n`` is the number of devices whose noise is sure to be in the sum: the protocol's threshold,
not the cohort size, since dropouts remove noise (calibrate to t). The accounting is for one
release per cohort a device contributes to, composed without sampling amplification, because
asynchronous participation is not Poisson sampling. The RDP curve is converted to
``(epsilon, delta)`` by dp-accounting (``rdp_privacy_accountant.compute_epsilon``); the bound is
our code, checked in ``tests/test_ddp_accounting.py`` against dp-accounting's Gaussian in the
limit where the two must agree.

:func:`calibrate` chooses the local noise for a target epsilon. It is the documented
calibration: the quantization step follows the noise so that a cohort's sum fits the ring
(:func:`step_for`), and the noise is the smallest that keeps ``releases`` releases within the
target. At 32 bits that is within 5 % of the continuous Gaussian's noise in the tested settings.

The mechanism is :mod:`fedmq.secagg.ddg_noise`. :func:`cohort_params` is where both ends derive
one cohort's parameters from what the aggregator announced, so that the device noises, the
aggregator decodes and both ledgers charge the same release.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

ORDERS: tuple[int, ...] = (*range(2, 129), 256, 512, 1024)
"""Integer Renyi orders: Proposition 14 is stated, and used by the paper's code, at integer orders."""


def tau(sigma: float, n: int) -> float:
    """The paper's gap term ``10 sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k / (k + 1))`` (0 for one device)."""
    if not (math.isfinite(sigma) and sigma > 0) or n < 1:
        raise ValueError(f"need sigma > 0 and n >= 1, got {sigma}, {n}")
    return 10.0 * sum(math.exp(-2.0 * (math.pi * sigma) ** 2 * k / (k + 1)) for k in range(1, n))


def rounded_l2_bound(l2: float, dim: int, beta: float) -> float:
    """L2 norm bound of a vector of norm ``l2`` (integer units) after conditional randomized rounding.

    With ``beta = 0`` (plain randomized rounding) a coordinate moves by less than 1, so the
    bound is ``l2 + sqrt(d)``. With ``beta`` in (0, 1), rounding is repeated until the norm is
    at most ``sqrt(l2^2 + d/4 + sqrt(2 ln(1/beta)) (l2 + sqrt(d)/2))`` (paper, Section 4.1).
    The smaller of the two holds.
    """
    if l2 < 0 or dim < 1 or not 0 <= beta < 1:
        raise ValueError(f"need l2 >= 0, dim >= 1 and 0 <= beta < 1, got {l2}, {dim}, {beta}")
    plain = l2 + math.sqrt(dim)
    if beta == 0:
        return plain
    conditional = math.sqrt(l2 * l2 + dim / 4 + math.sqrt(2 * math.log(1 / beta)) * (l2 + math.sqrt(dim) / 2))
    return min(plain, conditional)


@dataclass(frozen=True)
class DdgParams:
    """One release of the distributed discrete Gaussian, in real units where noted.

    Attributes:
        clip: L2 clip of each device's update (real units).
        gamma: quantization step (real units per integer); updates are scaled by ``1 / gamma``.
        local_stddev: each device's noise standard deviation (real units), ``sigma * gamma``.
        survivors: devices whose noise is sure to be in the sum (the threshold t).
        dim: length of the update vector.
        beta: conditional rounding parameter (0: plain randomized rounding).
    """

    clip: float
    gamma: float
    local_stddev: float
    survivors: int
    dim: int
    beta: float = math.exp(-0.5)

    def __post_init__(self) -> None:
        for name in ("clip", "gamma", "local_stddev"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be finite and > 0, got {v}")
        if self.survivors < 1 or self.dim < 1 or not 0 <= self.beta < 1:
            raise ValueError(f"need survivors >= 1, dim >= 1, 0 <= beta < 1, got {self}")

    @property
    def sigma(self) -> float:
        """Each device's noise in integer units."""
        return self.local_stddev / self.gamma

    @property
    def central_stddev(self) -> float:
        """Standard deviation of the summed noise of the survivors (real units)."""
        return math.sqrt(self.survivors) * self.local_stddev


def rdp(p: DdgParams, orders: Sequence[int] = ORDERS) -> npt.NDArray[np.float64]:
    """Renyi DP of one release at each order (Proposition 14), add/remove of one device."""
    l2 = rounded_l2_bound(p.clip / p.gamma, p.dim, p.beta)
    l1 = math.sqrt(p.dim) * l2  # Cauchy-Schwarz: the L1 norm of the rounded vector
    central = math.sqrt(p.survivors) * p.sigma
    s2, s1 = l2 / central, l1 / central
    t = tau(p.sigma, p.survivors)
    d = p.dim
    out = []
    for a in orders:
        if a <= 1 or int(a) != a:
            raise ValueError(f"orders must be integers > 1, got {a}")
        out.append(
            min(
                a / 2 * s2 * s2 + t * d,
                a / 2 * (s2 * s2 + 2 * s1 * t + t * t * d),
                a / 2 * (s2 + math.sqrt(d) * t) ** 2,
            )
        )
    return np.asarray(out, dtype=np.float64)


def epsilon(curve: npt.NDArray[np.float64], delta: float, orders: Sequence[int] = ORDERS) -> float:
    """``epsilon`` at ``delta`` of a composed RDP curve, converted by dp-accounting."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    from fedmq.rdp import rdp_modules  # the RDP accountant alone: no SciPy at large on a device

    eps, _ = rdp_modules()[0].compute_epsilon(list(orders), list(curve), delta)
    return float(eps)


@dataclass
class DdgLedger:
    """A device's releases under the distributed discrete Gaussian, as checkpointable data.

    ``releases`` counts the cohorts whose applied sum included the device, per parameter set.
    Composition is the sum of the RDP curves: no sampling amplification.
    """

    releases: dict[DdgParams, int]

    @classmethod
    def empty(cls) -> DdgLedger:
        """No release yet."""
        return cls({})

    def record(self, p: DdgParams, count: int = 1) -> None:
        """Count ``count`` more releases with ``p``."""
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        self.releases[p] = self.releases.get(p, 0) + count

    def curve(self) -> npt.NDArray[np.float64]:
        """The composed RDP curve over :data:`ORDERS`."""
        total = np.zeros(len(ORDERS))
        for p, n in self.releases.items():
            total += n * rdp(p)
        return total

    def epsilon(self, delta: float) -> float:
        """Cumulative epsilon at ``delta`` (0 before any release)."""
        return epsilon(self.curve(), delta) if self.releases else 0.0

    def to_state(self) -> list[dict[str, Any]]:
        """Plain data for a checkpoint."""
        return [{**p.__dict__, "count": n} for p, n in self.releases.items()]

    @classmethod
    def from_state(cls, state: list[dict[str, Any]]) -> DdgLedger:
        """Inverse of :meth:`to_state`; raises ValueError on a malformed entry."""
        ledger = cls.empty()
        for entry in state:
            fields = dict(entry)
            count = fields.pop("count")
            if type(count) is not int:
                raise ValueError(f"count must be an int, got {count!r}")
            ledger.record(DdgParams(**fields), count)
        return ledger


@dataclass(frozen=True)
class Calibration:
    """Parameters chosen by :func:`calibrate`, and what they give."""

    params: DdgParams
    bits: int
    releases: int
    epsilon: float
    delta: float

    @property
    def noise_multiplier(self) -> float:
        """Central noise over the clip: what a Gaussian mechanism of the same noise would be called."""
        return self.params.central_stddev / self.params.clip


def step_for(bits: int, clip: float, summands: int, local_stddev: float, k_stddevs: float = 4.0) -> float:
    """The quantization step at which a sum of ``summands`` updates and their noise fits ``bits``.

    A coordinate of one clipped update is at most ``clip`` (no rotation spreads it), so the sum
    is at most ``summands * clip`` plus noise of standard deviation ``sqrt(summands) * local_stddev``,
    which ``k_stddevs`` covers. The step makes that range the signed ring ``2^(bits-1) - 1``, so
    a sum never wraps unless its noise exceeds ``k_stddevs`` standard deviations.
    """
    if not 8 <= bits <= 62 or summands < 1 or not (clip > 0 and local_stddev > 0 and k_stddevs > 0):
        raise ValueError(f"need 8 <= bits <= 62, summands >= 1 and positive scales, got {bits}, {summands}")
    return float((summands * clip + k_stddevs * math.sqrt(summands) * local_stddev) / (2 ** (bits - 1) - 1))


def calibrate(
    target_epsilon: float,
    delta: float,
    *,
    releases: int,
    survivors: int,
    summands: int,
    dim: int,
    clip: float,
    bits: int = 32,
    beta: float = math.exp(-0.5),
    k_stddevs: float = 4.0,
) -> Calibration:
    """The smallest local noise whose ``releases`` releases stay within ``target_epsilon`` at ``delta``.

    The documented calibration. The quantization step follows the noise (:func:`step_for`).
    The noise is found by bisection on its logarithm, because epsilon falls as the noise grows.
    ``survivors`` is the threshold t, the fewest devices whose noise is sure to be in a sum.
    ``summands`` is the most updates a sum can hold (the cohort), and it sets the step.

    Raises:
        ValueError: bad arguments, or no noise reaches the target at these bits. Coarse steps
            make the rounding's sensitivity dominate, which no amount of noise overcomes.
    """
    if not (math.isfinite(target_epsilon) and target_epsilon > 0) or releases < 1 or summands < survivors:
        raise ValueError(
            f"need target_epsilon > 0, releases >= 1 and summands >= survivors, "
            f"got {target_epsilon}, {releases}, {summands} < {survivors}"
        )

    def at(local: float) -> tuple[DdgParams, float]:
        p = DdgParams(clip, step_for(bits, clip, summands, local, k_stddevs), local, survivors, dim, beta)
        return p, epsilon(releases * rdp(p), delta)

    lo, hi = 1e-4 * clip, 1e4 * clip
    p_hi, eps_hi = at(hi)
    if eps_hi > target_epsilon:
        raise ValueError(
            f"no noise gives epsilon {target_epsilon} in {releases} releases at {bits} bits and d = {dim}: "
            f"the best is {eps_hi:.3g} (rounding dominates; use more bits)"
        )
    best = (p_hi, eps_hi)
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        p, eps = at(mid)
        if eps <= target_epsilon:
            hi, best = mid, (p, eps)
        else:
            lo = mid
        if hi / lo < 1.001:
            break
    return Calibration(best[0], bits, releases, best[1], delta)


WEIGHT_SCALE = 0.1
"""Under distributed DP a device appends its staleness weight ``w <= 1`` as ``w * 0.1 C``: the
weight is noised and released with the update, so it counts in the sensitivity, and at a tenth
of the clip it adds half a percent to the noise instead of the 12 % that ``w`` itself costs at
``C = 2``. The aggregator divides the update sum by the number of uploads, and reads the weights'
sum (scaled back) only to check it is plausible."""


def weight_scale(clip_norm: float) -> float:
    """What the appended weight is multiplied by under distributed DP: ``WEIGHT_SCALE * C``."""
    return WEIGHT_SCALE * clip_norm


def input_clip(clip_norm: float) -> float:
    """The L2 bound of a device's noised input ``[w * clip(delta), w * 0.1 C]`` (``w <= 1``): ``C sqrt(1.01)``."""
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"clip_norm must be finite and > 0, got {clip_norm}")
    return clip_norm * math.sqrt(1.0 + WEIGHT_SCALE * WEIGHT_SCALE)


def cohort_params(
    *, stddev: float, survivors: int, clip_norm: float, beta: float, bits: int, members: int, dim: int
) -> DdgParams:
    """One cohort's release, as both ends compute it from the announcement.

    Each device adds ``stddev / sqrt(survivors)``, so any ``survivors`` uploads carry ``stddev``;
    the quantization step fits a sum of all ``members`` (:func:`step_for`); ``dim`` counts the
    appended weight.
    """
    if survivors < 2 or members < survivors:
        raise ValueError(f"need 2 <= survivors <= members, got {survivors}, {members}")
    clip = input_clip(clip_norm)
    local = stddev / math.sqrt(survivors)
    return DdgParams(clip, step_for(bits, clip, members, local), local, survivors, dim, beta)
