"""The distributed discrete Gaussian's device side: conditional rounding and discrete Gaussian noise.

Kairouz, Liu and Steinke, ICML 2021, arXiv:2102.06387. A device scales its clipped update by
``1 / gamma``, rounds it to integers with :func:`conditional_round`, and adds
:func:`discrete_gaussian` noise before masking. Its accounting is :mod:`fedmq.secagg.ddp`,
kept apart from the mechanism. Randomness comes from an injected ``uniform`` source,
:func:`fedmq.secagg.crypto.uniform` (AES-256-CTR under a fresh OS key) unless a test gives its
own. A device's noise must be as unpredictable to the server as its masks.

The sampler is the rejection sampler of Canonne, Kamath and Steinke (NeurIPS 2020,
arXiv:2004.00010, Algorithm 3): discrete Laplace proposals, accepted with probability
``exp(-(|y| - sigma^2/t)^2 / (2 sigma^2))``. The acceptance test is in floating point, as in
TFF's implementation, not in the paper's exact rational arithmetic. The pmf is checked against
``exp(-x^2 / 2 sigma^2)`` in ``tests/test_ddg_noise.py``.

:func:`encode` is the whole device side (scale, round, noise, reduce into the ring) and
:func:`decode` the aggregator's reading of an unmasked sum; the secure-aggregation client calls
them when the cohort announces distributed DP (:attr:`fedmq.secagg.messages.Params.dp_stddev`).
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from fedmq.secagg.crypto import Uniform
from fedmq.secagg.crypto import uniform as crypto_uniform
from fedmq.secagg.ddp import DdgParams, rounded_l2_bound, weight_scale
from fedmq.secagg.quantize import U64, dequantize, reduce, ring_dtype


def discrete_laplace(t: float, size: int, uniform: Uniform = crypto_uniform) -> npt.NDArray[np.int64]:
    """``size`` draws with ``P(x) proportional to exp(-|x| / t)`` on the integers (``t > 0``).

    The difference of two geometric variables of ratio ``exp(-1/t)``, each by inversion.
    """
    if not (math.isfinite(t) and t > 0) or size < 0:
        raise ValueError(f"need t > 0 and size >= 0, got {t}, {size}")
    u = 1.0 - uniform(2 * size)  # in (0, 1]: log is finite
    g = np.floor(-t * np.log(u)).astype(np.int64)
    return g[:size] - g[size:]


def discrete_gaussian(sigma: float, size: int, uniform: Uniform = crypto_uniform) -> npt.NDArray[np.int64]:
    """``size`` draws with ``P(x) proportional to exp(-x^2 / (2 sigma^2))`` on the integers (``sigma > 0``)."""
    if not (math.isfinite(sigma) and sigma > 0) or size < 0:
        raise ValueError(f"need sigma > 0 and size >= 0, got {sigma}, {size}")
    t = math.floor(sigma) + 1
    s2 = sigma * sigma
    out = np.empty(size, dtype=np.int64)
    todo = np.arange(size)
    while todo.size:
        y = discrete_laplace(t, todo.size, uniform)
        accept = uniform(todo.size) < np.exp(-((np.abs(y) - s2 / t) ** 2) / (2 * s2))
        out[todo[accept]] = y[accept]
        todo = todo[~accept]
    return out


class RoundingFailed(ValueError):
    """Conditional rounding did not meet its norm bound in ``max_tries``: the update is not released."""


def conditional_round(
    x: npt.NDArray[np.float64],
    clip_scaled: float,
    beta: float,
    uniform: Uniform = crypto_uniform,
    max_tries: int = 100,
) -> npt.NDArray[np.int64]:
    """Randomized rounding of ``x`` (already scaled by ``1 / gamma``) to integers, within the charged bound.

    Rounding is repeated until the L2 norm is within :func:`fedmq.secagg.ddp.rounded_l2_bound`
    of ``clip_scaled``. The bound is the one the accounting charges for, so a rounded vector that exceeds it is never
    released. Each coordinate rounds up with probability equal to its fractional part, so a
    rounding is unbiased. A repeat happens with probability at most ``beta`` per try.

    Raises:
        ValueError: ``x`` is not finite, or its norm exceeds ``clip_scaled`` (it was not clipped).
        RoundingFailed: ``max_tries`` roundings all exceeded the bound.
    """
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    if not np.isfinite(x).all():
        raise ValueError("the update is not finite")
    norm = float(np.sqrt(np.sum(x * x)))
    if norm > clip_scaled * (1 + 1e-9):
        raise ValueError(f"the scaled update has norm {norm:.6g} > the clip {clip_scaled:.6g}: clip it first")
    bound = rounded_l2_bound(clip_scaled, max(1, x.size), beta)
    low = np.floor(x)
    frac = x - low
    for _ in range(max_tries):
        r = low + (uniform(x.size) < frac)
        if float(np.sqrt(np.sum(r * r))) <= bound:
            return r.astype(np.int64)
    raise RoundingFailed(f"no rounding within the L2 bound {bound:.6g} in {max_tries} tries")


def device_input(values: npt.NDArray[np.float64], clip_norm: float) -> npt.NDArray[np.float64]:
    """``[w * clip(delta), w]`` (:func:`fedmq.secagg.client.weighted_input`) with the weight scaled to ``w * 0.1 C``.

    See :data:`fedmq.secagg.ddp.WEIGHT_SCALE`; the aggregator reads it back with :func:`weight_sum`.
    """
    out = np.array(values, dtype=np.float64).reshape(-1)
    out[-1] *= weight_scale(clip_norm)
    return out


def weight_sum(total: npt.NDArray[np.float64], clip_norm: float) -> float:
    """The (noised) sum of the weights from a decoded sum of :func:`device_input` vectors."""
    return float(total[-1]) / weight_scale(clip_norm)


def encode(values: npt.NDArray[np.float64], p: DdgParams, bits: int, uniform: Uniform = crypto_uniform) -> U64:
    """A device's share of one release: ``round(values / gamma) + DG(sigma^2)`` as integers mod ``2^bits``.

    ``values`` must already be clipped to ``p.clip`` (:func:`device_input`). The result is what
    the device masks.

    Raises:
        ValueError: the values are not finite or exceed the clip, or ``dim`` does not match.
        RoundingFailed: no rounding met the charged bound (the update is not released).
    """
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.size != p.dim:
        raise ValueError(f"the input has {x.size} values, the release was calibrated for {p.dim}")
    ints = conditional_round(x / p.gamma, p.clip / p.gamma, p.beta, uniform)
    ints += discrete_gaussian(p.sigma, ints.size, uniform)
    return reduce(ints.view(np.uint64), bits).astype(ring_dtype(bits))


def decode(total: U64, p: DdgParams, bits: int) -> npt.NDArray[np.float64]:
    """An unmasked sum of :func:`encode` outputs, read as signed and scaled back to update units."""
    return dequantize(total, scale=1.0 / p.gamma, bits=bits)
