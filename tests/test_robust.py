"""Tier 1: robust aggregation rules against numpy/scipy oracles, their wrappers, and the attacks."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import stats

from aggregator.core import AggregatorCore, FedBuffRule, Rejected
from aggregator.robust import CoordinateMedian, MultiKrum, NormBounded, TrimmedMean, WeightedMean, build_aggregate
from aggregator.rules.noise import NoiseCheck, dp_norm_window
from aggregator.rules.robust import (
    coordinate_median,
    krum_scores,
    l2_norms,
    multi_krum_select,
    norm_bound,
    trimmed_mean,
)
from aggregator.staleness import make_staleness_fn
from edge_agent.pipeline import Release
from fedmq.config import AggregatorConfig
from fedmq.errors import ConfigError, RejectReason
from fedmq.messages import UpdateMessage
from models.datasets import Dataset
from simulator.attacks import SIGN_FLIP_SCALE, Collusion, flip_labels, plan_attack

finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


def deltas_strategy(min_n: int = 1, max_n: int = 9) -> st.SearchStrategy[list[dict[str, np.ndarray]]]:
    return st.integers(min_n, max_n).flatmap(
        lambda n: st.tuples(
            hnp.arrays(np.float32, (n, 3, 2), elements=finite), hnp.arrays(np.float32, (n, 4), elements=finite)
        ).map(lambda ab: [{"w": ab[0][i], "b": ab[1][i]} for i in range(n)])
    )


def stacked(deltas: list[dict[str, np.ndarray]], k: str) -> np.ndarray:
    return np.stack([d[k] for d in deltas])


@settings(max_examples=60, deadline=None)
@given(deltas_strategy())
def test_coordinate_median_matches_numpy(deltas: list[dict[str, np.ndarray]]) -> None:
    out = coordinate_median(deltas)
    for k in ("w", "b"):
        expected = np.median(stacked(deltas, k).astype(np.float64), axis=0)
        assert out[k].dtype == np.float32 and out[k].shape == deltas[0][k].shape
        np.testing.assert_allclose(out[k], expected, rtol=1e-6, atol=1e-4)


@settings(max_examples=60, deadline=None)
@given(deltas_strategy(), st.sampled_from([0.0, 0.1, 0.2, 0.25, 0.4]))
def test_trimmed_mean_matches_scipy(deltas: list[dict[str, np.ndarray]], beta: float) -> None:
    out = trimmed_mean(deltas, beta)
    for k in ("w", "b"):
        expected = stats.trim_mean(stacked(deltas, k).astype(np.float64), beta, axis=0)
        assert out[k].dtype == np.float32
        np.testing.assert_allclose(out[k], expected, rtol=1e-5, atol=1e-3)


@settings(max_examples=60, deadline=None)
@given(deltas_strategy(), st.floats(0.01, 100))
def test_norm_bound_clips_to_the_bound_and_keeps_direction(deltas: list[dict[str, np.ndarray]], bound: float) -> None:
    out, clipped = norm_bound(deltas, bound)
    before, after = l2_norms(deltas), l2_norms(out)
    assert clipped == int((before > bound).sum())
    for i, (b, a) in enumerate(zip(before, after, strict=True)):
        if b > bound:
            assert a == pytest.approx(bound, rel=1e-4)
            for k in ("w", "b"):  # same direction: a positive multiple
                np.testing.assert_allclose(out[i][k] * np.float32(b / bound), deltas[i][k], rtol=1e-3, atol=1e-2)
        else:
            assert all(out[i][k] is deltas[i][k] for k in ("w", "b"))  # untouched, not copied


def test_norm_bound_of_a_zero_delta_is_zero_not_nan() -> None:
    out, clipped = norm_bound([{"w": np.zeros(3, np.float32)}], 1.0)
    assert clipped == 0 and np.array_equal(out[0]["w"], np.zeros(3, np.float32))


@settings(max_examples=40, deadline=None)
@given(deltas_strategy(min_n=5), st.integers(0, 3))
def test_krum_scores_match_a_brute_force_oracle(deltas: list[dict[str, np.ndarray]], f: int) -> None:
    n = len(deltas)
    if n < 2 * f + 3:
        with pytest.raises(ValueError, match="2f \\+ 3"):
            krum_scores(deltas, f)
        return
    flat = [np.concatenate([d[k].ravel() for k in ("w", "b")]).astype(np.float64) for d in deltas]
    expected = []
    for i in range(n):
        dists = sorted(float(np.sum((flat[i] - flat[j]) ** 2)) for j in range(n) if j != i)
        expected.append(sum(dists[: n - f - 2]))
    np.testing.assert_allclose(krum_scores(deltas, f), expected, rtol=1e-6, atol=1e-2)


def test_multi_krum_keeps_the_honest_cluster() -> None:
    rng = np.random.default_rng(0)
    honest = [{"w": rng.normal(0, 0.1, 10).astype(np.float32)} for _ in range(8)]
    byzantine = [{"w": np.full(10, 5.0 + i, np.float32)} for i in range(3)]
    deltas = honest[:4] + byzantine + honest[4:]
    keep = multi_krum_select(deltas, f=3, m=6)
    assert len(keep) == 6 and not set(keep) & {4, 5, 6}  # the byzantine ones sit at 4, 5, 6
    agg = MultiKrum(f=3, m=6)
    out = agg(deltas, [1.0] * len(deltas))
    assert np.abs(out["w"]).max() < 0.5 and agg.counters["excluded"] == 5


@pytest.mark.parametrize(
    "fn",
    [coordinate_median, lambda d: trimmed_mean(d, 0.1), lambda d: krum_scores(d, 0), lambda d: norm_bound(d, 1.0)],
)
def test_robust_rules_refuse_non_finite_input(fn: object) -> None:
    deltas = [{"w": np.ones(3, np.float32)} for _ in range(5)]
    deltas[2] = {"w": np.array([0, np.nan, 0], np.float32)}
    with pytest.raises(ValueError, match="not finite"):
        fn(deltas)  # type: ignore[operator]
    deltas[2] = {"w": np.array([0, np.inf, 0], np.float32)}
    with pytest.raises(ValueError, match="not finite"):
        fn(deltas)  # type: ignore[operator]


def test_adaptive_norm_bound_tames_a_scaled_update_before_the_mean() -> None:
    honest = [{"w": np.full(4, 0.1 * (i + 1), np.float32)} for i in range(5)]
    attack = {"w": np.full(4, 1000.0, np.float32)}
    agg = NormBounded(WeightedMean())
    out = agg([*honest, attack], [1.0] * 6)
    median_norm = float(np.median(l2_norms([*honest, attack])))
    assert float(np.linalg.norm(out["w"])) <= median_norm + 1e-5  # a mean of vectors within the bound
    assert agg.counters["clipped"] >= 1


def test_build_aggregate_composes_wrappers() -> None:
    assert isinstance(build_aggregate("none"), WeightedMean)
    assert isinstance(build_aggregate("median"), CoordinateMedian)
    nb = build_aggregate("norm_bound")
    assert isinstance(nb, NormBounded) and nb.max_norm is None  # adaptive by default
    both = build_aggregate("trimmed_mean", norm_bound=2.0)
    assert isinstance(both, NormBounded) and isinstance(both.inner, TrimmedMean) and both.max_norm == 2.0
    with pytest.raises(ValueError):
        build_aggregate("bogus")


def test_fedbuff_with_a_robust_aggregate_steps_by_the_median() -> None:
    w0 = {"w": np.zeros(3, np.float32)}
    rule = FedBuffRule(3, make_staleness_fn("constant", 0, 0), server_lr=0.5, aggregate=CoordinateMedian())
    core = AggregatorCore(w0, rule, max_staleness=5)
    vals = [np.array([1, 2, 3], np.float32), np.array([100, -100, 3], np.float32), np.array([2, 1, 3], np.float32)]
    for i, v in enumerate(vals):
        core.receive(UpdateMessage(agent_id=f"a{i}", seq=1, base_version=0, num_examples=1, delta={"w": v}))
    assert core.version == 1
    np.testing.assert_array_equal(core.weights["w"], np.float32(0.5) * np.array([2, 1, 3], np.float32))


@pytest.mark.parametrize(
    ("over", "key"),
    [
        ({"robust": "median", "rule": "fedasync"}, "aggregator.robust"),
        ({"robust": "norm_bound", "rule": "fedasync"}, "aggregator.norm_bound"),
        ({"robust": "norm_bound", "rule": "fedasync", "norm_bound": 0.0}, "aggregator.norm_bound"),
        ({"robust": "krum", "buffer_size": 6, "krum_f": 2}, "aggregator.krum_f"),
        ({"robust": "krum", "buffer_size": 10, "krum_f": 2, "krum_m": 9}, "aggregator.krum_m"),
        ({"robust": "trimmed_mean", "trim_fraction": 0.5}, "aggregator.trim_fraction"),
        ({"robust": "bogus"}, "aggregator.robust"),
        ({"norm_bound": -1.0}, "aggregator.norm_bound"),
        ({"dp_noise_multiplier": 0.0}, "aggregator.dp_noise_multiplier"),
        ({"dp_noise_multiplier": 0.5, "dp_clip_norm": 0.0}, "aggregator.dp_clip_norm"),
    ],
)
def test_robust_config_errors_name_the_key(over: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        replace(AggregatorConfig(), **over).validate()  # type: ignore[arg-type]
    assert info.value.key == key


def test_robust_config_accepts_sound_settings() -> None:
    for over in (
        {"robust": "krum", "buffer_size": 20, "krum_f": 8, "krum_m": 12},
        {"robust": "trimmed_mean", "trim_fraction": 0.3},
        {"robust": "norm_bound", "rule": "fedasync", "norm_bound": 5.0},
        {"robust": "median", "norm_bound": 0.0},
    ):
        replace(AggregatorConfig(), **over).validate()  # type: ignore[arg-type]


# --- attacks -----------------------------------------------------------------------------
def test_attack_plan_picks_the_fraction_and_poisons_only_them() -> None:
    plan = plan_attack("sign_flip", 0.2, 50, num_classes=10, buffer_size=20, server_lr=0.5, seed=3)
    assert len(plan.malicious) == 10 and plan.boost == 40
    honest_steps = [lambda r: r]
    bad, good = min(plan.malicious), min(set(range(50)) - plan.malicious)
    assert plan.steps_for(good, honest_steps, np.random.default_rng(0)) == honest_steps
    rel = Release({"w": np.array([1.0, -2.0], np.float32)}, 5, 0.1)
    (step,) = plan.steps_for(bad, honest_steps, np.random.default_rng(0))
    np.testing.assert_array_equal(step(rel).delta["w"], -SIGN_FLIP_SCALE * rel.delta["w"])
    assert plan_attack("none", 0.3, 50, num_classes=10, buffer_size=20, server_lr=0.5, seed=3).malicious == set()


def test_label_flip_and_scale_train_on_flipped_labels() -> None:
    data = Dataset(np.zeros((3, 2), np.float32), np.array([0, 3, 9]))
    assert flip_labels(data, 10).y.tolist() == [9, 6, 0]
    plan = plan_attack("scale", 0.5, 4, num_classes=10, buffer_size=4, server_lr=1.0, seed=0)
    for i in range(4):
        poisoned = plan.data_for(i, data)
        assert (poisoned.y.tolist() == [9, 6, 0]) == (i in plan.malicious)


def test_alie_stays_within_the_colluders_spread() -> None:
    c = Collusion(n_agents=50, n_malicious=10)
    assert c.z_max == pytest.approx(stats.norm.ppf((50 - (26 - 10)) / 50))
    rng = np.random.default_rng(0)
    pool = [{"w": rng.normal(0, 1, 100).astype(np.float32)} for _ in range(10)]
    for i, d in enumerate(pool):
        out = c.craft(i, d)
    stack = np.stack([d["w"] for d in pool])
    expected = stack.mean(axis=0) - np.float32(c.z_max) * stack.std(axis=0)
    np.testing.assert_allclose(out["w"], expected, rtol=1e-5, atol=1e-6)
    inside = (out["w"] >= stack.min(axis=0)) & (out["w"] <= stack.max(axis=0))
    assert inside.mean() > 0.95  # every coordinate looks benign


# --- the DP norm check ----------------------------------------------------------------------
def test_dp_norm_window_admits_honest_privatised_updates_and_nothing_unnoised() -> None:
    dim, z, clip = 650, 0.5, 1.0
    low, high = dp_norm_window(dim, z * clip, clip)
    rng = np.random.default_rng(0)
    honest = []
    for _ in range(2000):
        signal = rng.normal(0, 1, dim)
        signal *= rng.uniform(0, clip) / np.linalg.norm(signal)  # any clipped update
        honest.append(np.linalg.norm(signal + rng.normal(0, z * clip, dim)))
    assert low <= min(honest) and max(honest) <= high  # no false rejection in 2,000 draws
    assert high < 1.25 * np.sqrt(dim) * z * clip and low > 0.75 * np.sqrt(dim) * z * clip
    unnoised = np.linalg.norm(4.0 * rng.normal(0, 1, dim) / np.sqrt(dim))  # a -4x flipped delta
    assert unnoised < low


def test_core_rejects_an_update_that_does_not_fit_the_agreed_noise() -> None:
    w0 = {"w": np.zeros(400, np.float32)}
    core = AggregatorCore(
        w0, FedBuffRule(2, make_staleness_fn("constant", 0, 0)), noise_check=NoiseCheck(400, 0.5, 1.0)
    )
    rng = np.random.default_rng(1)
    noised = (rng.normal(0, 0.5, 400)).astype(np.float32)
    ok = core.receive(UpdateMessage(agent_id="a", seq=1, base_version=0, num_examples=1, delta={"w": noised}))
    bare = core.receive(
        UpdateMessage(agent_id="b", seq=1, base_version=0, num_examples=1, delta={"w": np.full(400, 0.01, np.float32)})
    )
    assert not isinstance(ok, Rejected)
    assert isinstance(bare, Rejected) and bare.reason is RejectReason.NOT_PRIVATE
    assert dict(core.stats.rejected) == {"not_private": 1}


def test_a_conforming_attacker_passes_the_check_with_a_bounded_signal() -> None:
    plan = plan_attack(
        "sign_flip", 0.5, 4, num_classes=10, buffer_size=4, server_lr=1.0, seed=0, conform_to=(650, 0.5, 1.0)
    )
    assert plan.disguise is not None
    low, high = dp_norm_window(650, 0.5, 1.0)
    rng = np.random.default_rng(2)
    steps = plan.steps_for(min(plan.malicious), [], rng)
    release = Release({"w": rng.normal(0, 1, 650).astype(np.float32)}, 5, 0.0)
    for step in steps:
        release = step(release)
    assert low <= float(np.linalg.norm(release.delta["w"])) <= high


def test_the_window_attacker_sends_an_unnoised_flipped_delta_at_the_windows_norm() -> None:
    plan = plan_attack("window", 0.5, 4, num_classes=10, buffer_size=4, server_lr=1.0, seed=0, window_norm=12.5)
    rng = np.random.default_rng(0)
    release = Release({"w": rng.normal(0, 1, 650).astype(np.float32)}, 5, 0.0)
    out = release
    for step in plan.steps_for(min(plan.malicious), [], rng):
        out = step(out)
    assert float(np.linalg.norm(out.delta["w"])) == pytest.approx(12.5, rel=1e-5)
    cos = float(out.delta["w"] @ release.delta["w"]) / (12.5 * float(np.linalg.norm(release.delta["w"])))
    assert cos == pytest.approx(-1.0, abs=1e-5)  # the trained direction, flipped; no noise


def test_the_inflating_attacker_claims_two_to_the_62_examples_after_the_honest_pipeline() -> None:
    plan = plan_attack("inflate", 0.5, 4, num_classes=10, buffer_size=4, server_lr=1.0, seed=0)
    honest = [lambda r: replace(r, norm=1.0)]
    steps = plan.steps_for(min(plan.malicious), honest, np.random.default_rng(0))
    out = Release({"w": np.ones(3, np.float32)}, 5, 0.0)
    for step in steps:
        out = step(out)
    assert out.num_examples == 2**62 and out.norm == 1.0  # the honest steps ran, then the claim
    assert plan.data_for(min(plan.malicious), Dataset(np.zeros((2, 1), np.float32), np.array([0, 1]))).y.tolist() == [
        9,
        8,
    ]


def test_the_fast_attacker_sends_twenty_times_as_often() -> None:
    assert plan_attack("fast", 0.2, 10, num_classes=10, buffer_size=4, server_lr=1.0, seed=0).speedup == 20
    assert plan_attack("sign_flip", 0.2, 10, num_classes=10, buffer_size=4, server_lr=1.0, seed=0).speedup == 1
