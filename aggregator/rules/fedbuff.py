"""FedBuff: buffered asynchronous aggregation.

Nguyen et al., "Federated Learning with Buffered Asynchronous Aggregation", AISTATS 2022,
arXiv:2106.06639, Alg. 1: the server collects ``K`` client deltas, then takes one step::

    delta_bar = sum_i w_i delta_i / sum_i w_i,   w_i = n_i * s(staleness_i)
    v        <- beta * v + delta_bar              (server momentum, beta = 0: plain)
    w        <- w + eta_g * v
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy.typing as npt

from aggregator.rules._checks import same_layout
from aggregator.rules.fedavg import weighted_mean

Tensors = dict[str, npt.NDArray[Any]]


def fedbuff_step(
    global_weights: Mapping[str, npt.NDArray[Any]],
    deltas: Sequence[Mapping[str, npt.NDArray[Any]]],
    weights: Sequence[float],
    *,
    server_lr: float = 1.0,
    momentum: float = 0.0,
    velocity: Mapping[str, npt.NDArray[Any]] | None = None,
    aggregate: Callable[[Sequence[Mapping[str, npt.NDArray[Any]]], Sequence[float]], Tensors] = weighted_mean,
) -> tuple[Tensors, Tensors | None]:
    """Apply one FedBuff server step to a full buffer; return ``(new_weights, new_velocity)``.

    ``velocity`` is the server-momentum state (``None`` before the first step); it is
    returned as ``None`` when ``momentum == 0``. ``aggregate`` reduces the buffer (the
    weighted mean of the paper, or a robust rule from :mod:`aggregator.robust`).
    """
    if not (math.isfinite(server_lr) and server_lr > 0):
        raise ValueError(f"server_lr must be > 0, got {server_lr}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    mean = aggregate(deltas, weights)
    same_layout(global_weights, [mean], "delta")
    new_velocity: Tensors | None = None
    if momentum > 0:
        if velocity is None:
            new_velocity = mean
        else:
            same_layout(global_weights, [velocity], "velocity")
            new_velocity = {k: velocity[k] * velocity[k].dtype.type(momentum) + mean[k] for k in mean}
        step = new_velocity
    else:
        step = mean
    out = {k: (w + w.dtype.type(server_lr) * step[k]).astype(w.dtype, copy=False) for k, w in global_weights.items()}
    return out, new_velocity


def staleness_weight(num_examples: int, s: float) -> float:
    """FedBuff's per-update weight ``n * s(staleness)`` as a Python float."""
    if num_examples < 1 or not (0 < s <= 1):
        raise ValueError(f"need num_examples >= 1 and 0 < s <= 1, got {num_examples}, {s}")
    return float(num_examples) * float(s)


__all__ = ["fedbuff_step", "staleness_weight"]
