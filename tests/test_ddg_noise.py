"""The distributed discrete Gaussian's device side (fedmq/secagg/ddg_noise.py) against exact pmfs."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest

from fedmq.secagg.crypto import UniformStream
from fedmq.secagg.ddg_noise import RoundingFailed, conditional_round, discrete_gaussian, discrete_laplace
from fedmq.secagg.ddp import rounded_l2_bound


def seeded(seed: int) -> UniformStream:
    """A replayable cryptographic stream: AES-256-CTR under a key derived from ``seed``."""
    return UniformStream(hashlib.sha256(seed.to_bytes(8, "big")).digest())


def total_variation(samples: np.ndarray, pmf: dict[int, float]) -> float:
    values, counts = np.unique(samples, return_counts=True)
    emp = dict(zip(values.tolist(), (counts / len(samples)).tolist(), strict=True))
    keys = set(emp) | set(pmf)
    return 0.5 * sum(abs(emp.get(k, 0.0) - pmf.get(k, 0.0)) for k in keys)


def dgauss_pmf(sigma: float, span: int) -> dict[int, float]:
    w = {x: math.exp(-x * x / (2 * sigma * sigma)) for x in range(-span, span + 1)}
    z = sum(w.values())
    return {x: v / z for x, v in w.items()}


@pytest.mark.parametrize("sigma", [0.4, 1.0, 3.0, 12.5])
def test_discrete_gaussian_has_the_exact_pmf(sigma: float) -> None:
    n = 200_000
    x = discrete_gaussian(sigma, n, seeded(1))
    assert x.dtype == np.int64 and x.shape == (n,)
    # With n samples over k outcomes the expected TV distance is about sqrt(k / (2 pi n)).
    span = int(12 * sigma) + 2
    assert total_variation(x, dgauss_pmf(sigma, span)) < 3 * math.sqrt((2 * span + 1) / (2 * math.pi * n)) + 0.002
    pmf = dgauss_pmf(sigma, span)
    var = sum(k * k * p for k, p in pmf.items())
    assert abs(float(np.mean(x))) < 5 * math.sqrt(var / n)
    assert float(np.var(x)) == pytest.approx(var, rel=0.03)


def test_discrete_laplace_has_the_exact_pmf() -> None:
    t, n = 2.5, 200_000
    x = discrete_laplace(t, n, seeded(2))
    w = {k: math.exp(-abs(k) / t) for k in range(-60, 61)}
    z = sum(w.values())
    assert total_variation(x, {k: v / z for k, v in w.items()}) < 0.01


def test_the_noise_comes_from_the_injected_source_and_by_default_from_the_cipher() -> None:
    assert np.array_equal(discrete_gaussian(2.0, 1000, seeded(5)), discrete_gaussian(2.0, 1000, seeded(5)))
    assert not np.array_equal(discrete_gaussian(2.0, 1000, seeded(5)), discrete_gaussian(2.0, 1000, seeded(6)))
    a, b = discrete_gaussian(2.0, 1000), discrete_gaussian(2.0, 1000)  # AES-CTR under fresh keys
    assert not np.array_equal(a, b)
    with pytest.raises(ValueError):
        discrete_gaussian(0.0, 10)
    with pytest.raises(ValueError):
        discrete_gaussian(float("inf"), 10)


def test_conditional_rounding_is_unbiased_and_within_the_charged_bound() -> None:
    d, clip = 400, 50.0
    x = np.sin(np.arange(1, d + 1) * 0.7) * 3 + 0.37  # fixed, non-integer coordinates
    x *= clip / np.linalg.norm(x)
    bound = rounded_l2_bound(clip, d, math.exp(-0.5))
    uni = seeded(4)
    draws = np.stack([conditional_round(x, clip, math.exp(-0.5), uni) for _ in range(2000)])
    assert draws.dtype == np.int64
    assert np.all(np.sqrt((draws.astype(float) ** 2).sum(axis=1)) <= bound + 1e-9)
    assert np.all(np.abs(draws - x) < 1)  # each coordinate goes to floor or ceil
    # Unbiased up to the small conditioning effect: mean error per coordinate well under 0.05.
    assert float(np.max(np.abs(draws.mean(axis=0) - x))) < 0.05


def test_conditional_rounding_refuses_unclipped_or_non_finite_input_and_gives_up_by_name() -> None:
    with pytest.raises(ValueError, match="clip it first"):
        conditional_round(np.array([3.0, 4.0]), 4.0, 0.5)
    with pytest.raises(ValueError, match="not finite"):
        conditional_round(np.array([np.nan, 0.0]), 4.0, 0.5)
    # Half-way coordinates with a bound that needs all of them rounded down: unlikely, so it fails.
    x = np.full(64, 0.5)
    with pytest.raises(RoundingFailed):
        conditional_round(x, float(np.linalg.norm(x)), 0.999999, lambda n: np.full(n, 0.1), max_tries=3)
