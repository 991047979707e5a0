"""Central differential privacy: the aggregator clips, sums and noises (it sees every update: trusted).

DP-FedAvg with a fixed denominator (McMahan, Ramage, Talwar, Zhang, "Learning Differentially
Private Recurrent Language Models", ICLR 2018, Alg. 1): each delta is clipped to L2 norm ``C``,
weighted by ``w_i <= 1``, summed, and ``N(0, (z C)^2 I)`` is added before dividing by the number
of summands ``K``. Adding or removing one device's delta moves the sum by at most ``C``, so one
step is the Gaussian mechanism with noise multiplier ``z`` for every contributor; the accountant
(:mod:`aggregator.privacy`) composes one release per contribution.

This is the baseline that trusts the server: the noise protects the published model from
everyone who reads it, but not the updates from the aggregator itself. Distributed DP under
secure aggregation (:mod:`fedmq.secagg.ddg_noise`) removes that trust.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from aggregator.rules._checks import same_layout

Tensors = dict[str, npt.NDArray[Any]]


def clip_factor(delta: Mapping[str, npt.NDArray[Any]], clip: float) -> float:
    """``min(1, C / ||delta||)`` over all tensors (1 for a zero delta: no division by a zero norm)."""
    total = 0.0
    for t in delta.values():
        flat = np.asarray(t, dtype=np.float64).reshape(-1)
        total += float(np.sum(flat * flat))
    norm = math.sqrt(total)
    if not math.isfinite(norm):
        raise ValueError("a delta is not finite")
    return 1.0 if norm <= clip else clip / norm


def noised_mean(
    deltas: Sequence[Mapping[str, npt.NDArray[Any]]],
    weights: Sequence[float],
    *,
    clip: float,
    stddev: float,
    rng: np.random.Generator,
) -> Tensors:
    """``(sum_i w_i clip_C(delta_i) + N(0, stddev^2 I)) / K`` in float64, cast to each tensor's dtype.

    Raises:
        ValueError: no deltas, mismatched layouts, a weight outside ``(0, 1]``, a non-finite delta,
            or ``clip``/``stddev`` out of range.
    """
    if not deltas:
        raise ValueError("no deltas to aggregate")
    if len(weights) != len(deltas):
        raise ValueError(f"{len(deltas)} deltas but {len(weights)} weights")
    if not (math.isfinite(clip) and clip > 0) or not (math.isfinite(stddev) and stddev >= 0):
        raise ValueError(f"need clip > 0 and stddev >= 0, got {clip}, {stddev}")
    if not all(0 < w <= 1 for w in weights):
        raise ValueError("central DP weights must be in (0, 1]: a larger one would exceed the sensitivity")
    same_layout(deltas[0], deltas, "delta")
    total = {k: np.zeros(np.shape(v), dtype=np.float64) for k, v in deltas[0].items()}
    for d, w in zip(deltas, weights, strict=True):
        f = w * clip_factor(d, clip)
        for k, v in d.items():
            total[k] += f * np.asarray(v, dtype=np.float64)
    k_count = float(len(deltas))
    return {
        k: ((v + rng.normal(0.0, stddev, size=v.shape)) / k_count).astype(np.asarray(deltas[0][k]).dtype)
        for k, v in total.items()
    }


__all__ = ["clip_factor", "noised_mean"]
