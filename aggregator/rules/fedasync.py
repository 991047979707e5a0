"""FedAsync: mix each arriving client model into the global model at once.

Xie, Koyejo, Gupta, "Asynchronous Federated Optimization", arXiv:1903.03934 (2019), Alg. 1:
on a client model ``x_new`` trained from version ``tau`` at server version ``t``::

    alpha_t = alpha * s(t - tau)
    w_t+1   = (1 - alpha_t) * w_t + alpha_t * x_new

Clients send deltas, so ``x_new = w_tau + delta`` with ``w_tau`` the base version.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy.typing as npt

from aggregator.rules._checks import same_layout

Tensors = dict[str, npt.NDArray[Any]]


def fedasync_mix(
    global_weights: Mapping[str, npt.NDArray[Any]],
    base_weights: Mapping[str, npt.NDArray[Any]],
    delta: Mapping[str, npt.NDArray[Any]],
    alpha_t: float,
) -> Tensors:
    """Return ``(1 - alpha_t) * w_t + alpha_t * (w_tau + delta)`` for each tensor.

    Args:
        global_weights: the current global model ``w_t``.
        base_weights: the version ``w_tau`` the client trained from (``w_t`` if not stale).
        delta: the client's update ``x_new - w_tau``.
        alpha_t: the mixing weight, already multiplied by ``s(staleness)``; in (0, 1].
    """
    if not (math.isfinite(alpha_t) and 0 < alpha_t <= 1):
        raise ValueError(f"alpha_t must be in (0, 1], got {alpha_t}")
    same_layout(global_weights, [base_weights, delta], "input")
    out: Tensors = {}
    for k, w in global_weights.items():
        a = w.dtype.type(alpha_t)
        # w + a * ((w_tau + delta) - w), computed in w's dtype.
        out[k] = w + a * ((base_weights[k] + delta[k]) - w)
    return out
