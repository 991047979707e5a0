"""Weighted averaging: FedAvg (McMahan et al., AISTATS 2017, arXiv:1602.05629).

``weighted_mean`` is the shared kernel: synchronous FedAvg applies it to the deltas of
one round (server learning rate 1); FedBuff applies it to its buffer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from aggregator.rules._checks import check_weights, same_layout

Tensors = dict[str, npt.NDArray[Any]]


def weighted_mean(tensors: Sequence[Mapping[str, npt.NDArray[Any]]], weights: Sequence[float]) -> Tensors:
    """Return ``sum_i w_i x_i / sum_i w_i`` per tensor, in each tensor's own dtype.

    The weights are normalised as Python floats and applied as scalars of the tensor's
    dtype, so float32 inputs stay float32 (no float64 promotion).
    """
    if not tensors:
        raise ValueError("weighted_mean of no tensors")
    if len(tensors) != len(weights):
        raise ValueError(f"{len(tensors)} tensors but {len(weights)} weights")
    check_weights(weights)
    same_layout(tensors[0], tensors[1:], "input")
    total = float(sum(weights))
    out: Tensors = {}
    for k, ref in tensors[0].items():
        acc = np.zeros(ref.shape, dtype=ref.dtype)
        for t, w in zip(tensors, weights, strict=True):
            if w:
                acc += ref.dtype.type(w / total) * t[k]
        out[k] = acc
    return out


def fedavg_step(
    global_weights: Mapping[str, npt.NDArray[Any]],
    deltas: Sequence[Mapping[str, npt.NDArray[Any]]],
    num_examples: Sequence[float],
    aggregate: Callable[[Sequence[Mapping[str, npt.NDArray[Any]]], Sequence[float]], Tensors] | None = None,
) -> Tensors:
    """One synchronous FedAvg round: ``w + sum_i n_i delta_i / sum_i n_i`` (or ``w + aggregate(...)``).

    ``num_examples`` are the weights: the example counts, or 1 each under a robust aggregate.
    """
    mean = (aggregate or weighted_mean)(deltas, [float(n) for n in num_examples])
    same_layout(global_weights, [mean], "delta")
    return {k: (v + mean[k]).astype(v.dtype, copy=False) for k, v in global_weights.items()}
