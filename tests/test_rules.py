"""Tier 1: staleness functions and aggregation rules against numpy oracles and properties."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.rules import fedasync_mix, fedbuff_step, weighted_mean
from aggregator.rules.fedavg import fedavg_step
from aggregator.rules.fedbuff import staleness_weight
from aggregator.staleness import constant, hinge, make_staleness_fn, polynomial


def _tensors(rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {
        "W": (rng.standard_normal((5, 3)) * scale).astype(np.float32),
        "b": (rng.standard_normal(3) * scale).astype(np.float32),
    }


@pytest.mark.parametrize(("s", "expected"), [(0, 1.0), (1, 2**-0.5), (3, 0.5), (8, 1 / 3)])
def test_polynomial_matches_formula(s: int, expected: float) -> None:
    assert polynomial(s, 0.5) == pytest.approx(expected)


@pytest.mark.parametrize(("s", "expected"), [(0, 1.0), (4, 1.0), (5, 1 / 11), (7, 1 / 31)])
def test_hinge_matches_formula(s: int, expected: float) -> None:
    assert hinge(s, a=10, b=4) == pytest.approx(expected)


@settings(max_examples=100)
@given(st.sampled_from(["constant", "polynomial", "hinge"]), st.floats(0, 5), st.integers(0, 10), st.integers(0, 1000))
def test_staleness_functions_are_in_unit_interval_and_non_increasing(name: str, a: float, b: int, s: int) -> None:
    f = make_staleness_fn(name, a, b)
    assert 0 < f(s + 1) <= f(s) <= 1
    assert type(f(s)) is float


def test_staleness_rejects_negative_and_unknown() -> None:
    with pytest.raises(ValueError):
        constant(-1)
    with pytest.raises(ValueError):
        make_staleness_fn("exp")


def test_weighted_mean_oracle_and_float32_kept() -> None:
    rng = np.random.default_rng(0)
    ts = [_tensors(rng) for _ in range(4)]
    w = [1.0, 2.0, 0.5, 3.5]
    out = weighted_mean(ts, w)
    for k in ts[0]:
        oracle = sum(wi * t[k].astype(np.float64) for wi, t in zip(w, ts, strict=True)) / sum(w)
        np.testing.assert_allclose(out[k], oracle, rtol=1e-5, atol=1e-6)
        assert out[k].dtype == np.float32


@pytest.mark.parametrize("weights", [[1.0, -1.0], [0.0, 0.0], [float("nan"), 1.0], [float("inf"), 1.0]])
def test_weighted_mean_validates_weights(weights: list[float]) -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        weighted_mean([_tensors(rng), _tensors(rng)], weights)


def test_weighted_mean_validates_layout() -> None:
    rng = np.random.default_rng(0)
    a, b = _tensors(rng), _tensors(rng)
    b["W"] = b["W"][:, :2]
    with pytest.raises(ValueError, match="shape"):
        weighted_mean([a, b], [1.0, 1.0])
    with pytest.raises(ValueError):
        weighted_mean([], [])


def test_fedasync_mix_oracle() -> None:
    rng = np.random.default_rng(1)
    w, base, delta = _tensors(rng), _tensors(rng), _tensors(rng, 0.1)
    out = fedasync_mix(w, base, delta, 0.3)
    for k in w:
        np.testing.assert_allclose(out[k], 0.7 * w[k] + 0.3 * (base[k] + delta[k]), rtol=1e-5, atol=1e-6)
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError):
            fedasync_mix(w, base, delta, bad)


def test_fedbuff_step_oracle_with_staleness_weights() -> None:
    rng = np.random.default_rng(2)
    w = _tensors(rng)
    deltas = [_tensors(rng, 0.1) for _ in range(3)]
    n, stale = [10, 30, 20], [0, 1, 3]
    weights = [staleness_weight(ni, polynomial(si, 0.5)) for ni, si in zip(n, stale, strict=True)]
    assert weights == pytest.approx([10.0, 30 / 2**0.5, 10.0])
    out, vel = fedbuff_step(w, deltas, weights, server_lr=0.7)
    assert vel is None
    for k in w:
        mean = sum(wi * d[k].astype(np.float64) for wi, d in zip(weights, deltas, strict=True)) / sum(weights)
        np.testing.assert_allclose(out[k], w[k] + 0.7 * mean, rtol=1e-5, atol=1e-6)


def test_fedbuff_server_momentum_over_two_steps() -> None:
    rng = np.random.default_rng(3)
    w0 = _tensors(rng)
    d1, d2 = [_tensors(rng, 0.1)], [_tensors(rng, 0.1)]
    w1, v1 = fedbuff_step(w0, d1, [1.0], server_lr=0.5, momentum=0.9)
    w2, v2 = fedbuff_step(w1, d2, [1.0], server_lr=0.5, momentum=0.9, velocity=v1)
    assert v2 is not None
    for k in w0:
        v_1 = d1[0][k]
        v_2 = 0.9 * v_1 + d2[0][k]
        np.testing.assert_allclose(v2[k], v_2, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(w2[k], w0[k] + 0.5 * v_1 + 0.5 * v_2, rtol=1e-5, atol=1e-6)


def test_fedavg_step_is_example_weighted_delta_mean() -> None:
    rng = np.random.default_rng(4)
    w = _tensors(rng)
    deltas = [_tensors(rng, 0.1) for _ in range(2)]
    out = fedavg_step(w, deltas, [1, 3])
    for k in w:
        np.testing.assert_allclose(out[k], w[k] + 0.25 * deltas[0][k] + 0.75 * deltas[1][k], rtol=1e-5, atol=1e-6)


def test_rule_preconditions() -> None:
    rng = np.random.default_rng(5)
    w = _tensors(rng)
    with pytest.raises(ValueError):
        fedbuff_step(w, [w], [1.0], server_lr=0)
    with pytest.raises(ValueError):
        fedbuff_step(w, [w], [1.0], momentum=1.0)
    with pytest.raises(ValueError):
        staleness_weight(0, 1.0)
