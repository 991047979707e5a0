"""Tier 1: clipping, Gaussian noise, the accountant, and the release pipeline."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edge_agent.pipeline import BudgetExhausted, ClipStep, GaussianNoiseStep, Release, build_pipeline, run_pipeline
from edge_agent.privacy import PrivacyAccountant, add_gaussian_noise, clip_l2, l2_norm
from edge_agent.trainer import LocalTrainer, TrainingDiverged
from fedmq.config import AgentConfig, PrivacyConfig
from fedmq.errors import ConfigError
from fedmq.messages import ModelMessage, ModelSpec
from models import create_model
from models.datasets import digits


def test_clip_zero_update_is_returned_unchanged() -> None:
    z = {"w": np.zeros(5, np.float32)}
    out, norm = clip_l2(z, 1.0)
    assert norm == 0.0 and not out["w"].any() and np.isfinite(out["w"]).all()


@settings(max_examples=100, deadline=None)
@given(hnp.arrays(np.float32, 20, elements=st.floats(-100, 100, width=32)), st.floats(0.01, 50))
def test_clip_bounds_the_norm_and_keeps_direction(v: np.ndarray, bound: float) -> None:
    out, norm = clip_l2({"v": v}, bound)
    assert l2_norm(out) <= bound * (1 + 1e-5)
    if norm <= bound:
        np.testing.assert_array_equal(out["v"], v)
    else:
        np.testing.assert_allclose(out["v"], v * (bound / norm), rtol=1e-5, atol=1e-6)


def test_clip_refuses_non_finite_and_bad_bound() -> None:
    with pytest.raises(ValueError):
        clip_l2({"v": np.array([np.inf], np.float32)}, 1.0)
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError):
            clip_l2({"v": np.ones(2, np.float32)}, bad)


def test_noise_has_the_requested_std_and_uses_the_injected_rng() -> None:
    x = {"v": np.zeros(200_000, np.float32)}
    a = add_gaussian_noise(x, 0.7, np.random.default_rng(1))["v"]
    b = add_gaussian_noise(x, 0.7, np.random.default_rng(1))["v"]
    assert np.array_equal(a, b) and a.dtype == np.float32
    assert a.std() == pytest.approx(0.7, rel=0.01) and abs(a.mean()) < 0.01


def test_accountant_matches_dp_accounting_directly() -> None:
    acc = PrivacyAccountant(1e-5)
    for _ in range(10):
        acc.record(1.0)
    acc.record(2.0, 5)
    ref = rdp.RdpAccountant()
    ref.compose(dp_accounting.GaussianDpEvent(1.0), 10)
    ref.compose(dp_accounting.GaussianDpEvent(2.0), 5)
    assert acc.epsilon() == pytest.approx(ref.get_epsilon(1e-5))
    assert acc.releases == 15 and acc.history == [(1.0, 10), (2.0, 5)]


def test_accountant_is_monotone_and_zero_noise_is_infinite() -> None:
    acc = PrivacyAccountant(1e-5)
    assert acc.epsilon() == 0.0
    eps = []
    for _ in range(5):
        acc.record(1.0)
        eps.append(acc.epsilon())
    assert eps == sorted(eps) and eps[0] > 0
    acc.record(0.0)
    assert acc.epsilon() == math.inf


def test_accountant_state_roundtrip_and_domain() -> None:
    a = PrivacyAccountant(1e-6)
    a.record(0.8, 3)
    b = PrivacyAccountant(1e-6)
    b.load_state_dict(a.state_dict())
    assert b.epsilon() == a.epsilon()
    with pytest.raises(ValueError):
        PrivacyAccountant(1e-5).load_state_dict(a.state_dict())
    for bad in (0.0, 1.0, -1e-5):
        with pytest.raises(ValueError):
            PrivacyAccountant(bad)


@pytest.mark.parametrize(
    ("field", "value"),
    [("delta", 0.0), ("delta", 1.0), ("clip_norm", 0.0), ("noise_multiplier", -1.0), ("epsilon_budget", 0.0)],
)
def test_privacy_config_domains_name_the_key(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=f"privacy.{field}"):
        PrivacyConfig(**{field: value}).validate()  # type: ignore[arg-type]


def test_pipeline_clips_then_noises_and_stops_at_the_budget() -> None:
    acc = PrivacyAccountant(1e-5)
    cfg = PrivacyConfig(clip_norm=1.0, noise_multiplier=1.0, epsilon_budget=8.0)
    steps = build_pipeline(cfg, np.random.default_rng(0), acc)
    assert isinstance(steps[0], ClipStep) and isinstance(steps[1], GaussianNoiseStep)
    big = Release({"v": np.full(100, 10.0, np.float32)}, 5, 0.0)
    released = 0
    exhausted: BudgetExhausted | None = None
    for _ in range(1000):
        try:
            out = run_pipeline(steps, big)
        except BudgetExhausted as exc:
            exhausted = exc
            break
        assert out.norm == pytest.approx(100.0) and out.epsilon is not None and out.epsilon <= 8.0
        released += 1
    assert exhausted is not None
    assert released == acc.releases > 0
    assert acc.epsilon() <= 8.0 < exhausted.epsilon_next


def test_noise_step_refuses_an_unclipped_delta() -> None:
    step = GaussianNoiseStep(1.0, 1.0, np.random.default_rng(0), PrivacyAccountant(1e-5))
    with pytest.raises(ValueError, match="clipped"):
        step(Release({"v": np.full(4, 5.0, np.float32)}, 1, 0.0))


def test_no_dp_pipeline_is_empty() -> None:
    assert build_pipeline(PrivacyConfig(enabled=False), np.random.default_rng(0), None) == []


def _model_msg(version: int = 0, mode: str = "async", selected: tuple[str, ...] | None = None) -> ModelMessage:
    m = create_model("softmax", num_features=64, num_classes=10)
    return ModelMessage(
        version=version, model=ModelSpec("softmax", 64, 10), tensors=m.get_weights(), mode=mode, selected=selected
    )  # type: ignore[arg-type]


def test_trainer_update_is_clipped_noised_accounted_and_persisted(tmp_path: Path) -> None:
    train, _ = digits()
    cfg = PrivacyConfig(clip_norm=0.5, noise_multiplier=0.0001)
    state = tmp_path / "a.state"
    t = LocalTrainer(
        AgentConfig(agent_id="a", local_epochs=2),
        cfg,
        train.subset(np.arange(100)),
        rng=np.random.default_rng(0),
        state_path=state,
    )
    u = t.train(_model_msg(3))
    assert u.base_version == 3 and u.num_examples == 64 and u.agent_id == "a"  # 100, reported as a power of two
    assert l2_norm(u.delta) == pytest.approx(0.5, rel=0.05)
    assert u.epsilon == t.epsilon and u.epsilon is not None and u.epsilon > 0
    t2 = LocalTrainer(
        AgentConfig(agent_id="a"), cfg, train.subset(np.arange(10)), rng=np.random.default_rng(0), state_path=state
    )
    assert t2.seq >= u.seq and t2.accountant is not None and t2.accountant.releases == 1
    with pytest.raises(ValueError, match="belongs to agent"):
        LocalTrainer(AgentConfig(agent_id="b"), cfg, train, rng=np.random.default_rng(0), state_path=state)


def test_trainer_sync_mode_trains_once_per_version_and_only_when_selected() -> None:
    train, _ = digits()
    t = LocalTrainer(
        AgentConfig(agent_id="a"),
        PrivacyConfig(enabled=False),
        train.subset(np.arange(50)),
        rng=np.random.default_rng(0),
    )
    assert t.should_train(_model_msg(0, "async")) and t.should_train(_model_msg(0, "async"))
    assert not t.should_train(_model_msg(1, "sync", ("b",)))
    m = _model_msg(1, "sync", ("a", "b"))
    assert t.should_train(m)
    t.train(m)
    assert not t.should_train(m)
    with pytest.raises(ValueError, match="features"):
        LocalTrainer(
            AgentConfig(agent_id="a"),
            PrivacyConfig(enabled=False),
            type(train)(train.x[:, :10].copy(), train.y),
            rng=np.random.default_rng(0),
        ).train(m)


def test_the_rdp_accountant_alone_gives_the_library_numbers_without_importing_scipy_at_large() -> None:
    """The agent loads only dp_accounting's RDP accountant (about 70 MiB less RSS). In a fresh
    interpreter: the same epsilons as the whole package, no scipy.stats/optimize/signal, and
    a later plain ``import dp_accounting`` (with a subsampled event, which needs the real
    scipy.special) still works."""
    script = """
import sys, json
from edge_agent.privacy import PrivacyAccountant
acc = PrivacyAccountant(1e-5)
acc.record(1.0, 10)
acc.record(2.0, 5)
lite = acc.epsilon()
heavy = sorted(m for m in ("scipy.stats", "scipy.optimize", "scipy.signal", "scipy.special",
                           "dp_accounting.pld") if m in sys.modules)
import dp_accounting
from dp_accounting import rdp
ref = rdp.RdpAccountant()
ref.compose(dp_accounting.GaussianDpEvent(1.0), 10)
ref.compose(dp_accounting.GaussianDpEvent(2.0), 5)
sampled = rdp.RdpAccountant()
sampled.compose(dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(1.0)), 100)
print(json.dumps([lite, ref.get_epsilon(1e-5), heavy, sampled.get_epsilon(1e-5)]))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    lite, full, heavy, sampled = json.loads(out)
    assert lite == full and math.isfinite(lite)
    assert heavy == []
    assert 0 < sampled < lite


def test_the_accountant_loads_once_under_concurrent_first_use() -> None:
    """Simulated agents compute epsilons in worker threads; the first uses race to load it."""
    script = """
import threading
from edge_agent.privacy import PrivacyAccountant
errors = []
def work():
    try:
        acc = PrivacyAccountant(1e-5)
        acc.record(1.0, 3)
        assert acc.epsilon() > 0
    except Exception as exc:
        errors.append(repr(exc))
threads = [threading.Thread(target=work) for _ in range(16)]
for t in threads: t.start()
for t in threads: t.join()
print(errors)
"""
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
        assert out.strip() == "[]"


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the overflow is the point
def test_diverged_local_training_releases_nothing_and_spends_no_budget() -> None:
    """A learning rate far too high makes NaN/Inf: the round is skipped, not crashed, not accounted."""
    train, _ = digits()
    t = LocalTrainer(
        AgentConfig(agent_id="a", lr=1e38),
        PrivacyConfig(clip_norm=1.0, noise_multiplier=1.0),
        train.subset(np.arange(200)),
        rng=np.random.default_rng(0),
    )
    seq = t.seq
    with pytest.raises(TrainingDiverged, match="version 4 diverged"):
        t.train(_model_msg(4))
    assert t.seq == seq and t.accountant is not None and t.accountant.releases == 0
