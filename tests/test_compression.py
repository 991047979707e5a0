"""Tier 1: update compression (fp16, int8, top-k) on the wire, and error feedback on the agent."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edge_agent.pipeline import CompressStep, Release, build_pipeline
from edge_agent.privacy import PrivacyAccountant
from fedmq.compression import Quantized, Sparse, compress, dense
from fedmq.config import AgentConfig, PrivacyConfig
from fedmq.errors import ConfigError
from fedmq.messages import UpdateMessage

rng = np.random.default_rng(0)
DELTA = {"w": rng.standard_normal((64, 10)).astype(np.float32), "b": rng.standard_normal(10).astype(np.float32)}


def _send(method: str, delta: dict[str, np.ndarray], **kw: float) -> tuple[UpdateMessage, int]:
    wire = {k: compress(method, v, **kw) for k, v in delta.items()}
    seen = {k: dense(w).astype(np.float32) for k, w in wire.items()}
    payload = UpdateMessage("a1", 1, 0, 5, seen, wire=wire).to_bytes()
    return UpdateMessage.from_bytes(payload), len(payload)


@pytest.mark.parametrize("method", ["fp16", "int8", "topk"])
def test_the_aggregator_decodes_exactly_what_the_agent_meant_to_send(method: str) -> None:
    back, _ = _send(method, DELTA)
    for k, v in DELTA.items():
        expected = dense(compress(method, v))
        assert back.delta[k].dtype == np.float32 and back.delta[k].shape == v.shape
        np.testing.assert_array_equal(back.delta[k], expected)


def test_bytes_per_update_shrink_as_promised() -> None:
    big = {"w": rng.standard_normal(100_000).astype(np.float32)}
    _, plain = _send("none", big)
    sizes = {m: _send(m, big)[1] / plain for m in ("fp16", "int8")}
    sizes["topk"] = _send("topk", big, topk_fraction=0.01)[1] / plain
    assert 0.49 < sizes["fp16"] < 0.51
    assert 0.24 < sizes["int8"] < 0.26
    assert 0.019 < sizes["topk"] < 0.021  # 1% of entries, 8 bytes each instead of 4


@settings(max_examples=100, deadline=None)
@given(hnp.arrays(np.float32, hnp.array_shapes(max_dims=3, max_side=20), elements=st.floats(-1e3, 1e3, width=32)))
def test_int8_error_is_at_most_half_a_step(x: np.ndarray) -> None:
    with np.errstate(divide="raise", over="raise", invalid="raise"):  # for any finite input
        q = compress("int8", x)
    assert isinstance(q, Quantized)
    assert np.isfinite(q.scale) and q.scale > 0
    assert np.all(np.abs(q.dense() - x) <= q.scale / 2 * (1 + 1e-5) + 1e-30)


def test_int8_of_subnormal_values_is_zero_not_garbage() -> None:
    x = np.array([1e-45, -1e-45, 0.0], dtype=np.float32)
    with np.errstate(divide="raise", over="raise", invalid="raise"):
        q = compress("int8", x)
    assert isinstance(q, Quantized)
    np.testing.assert_array_equal(q.q, [0, 0, 0])


@settings(max_examples=100, deadline=None)
@given(
    hnp.arrays(np.float32, hnp.array_shapes(max_dims=2, max_side=30), elements=st.floats(-1e3, 1e3, width=32)),
    st.floats(0.01, 1.0),
)
def test_topk_keeps_the_largest_entries(x: np.ndarray, fraction: float) -> None:
    s = compress("topk", x, topk_fraction=fraction)
    assert isinstance(s, Sparse)
    kept = np.abs(x.reshape(-1)[s.index])
    dropped = np.delete(np.abs(x.reshape(-1)), s.index)
    assert s.index.size == max(1, int(np.ceil(fraction * x.size)))
    assert np.all(np.diff(s.index.astype(np.int64)) > 0)
    if dropped.size and kept.size:
        assert kept.min() >= dropped.max()


def test_error_feedback_delays_but_never_loses_a_part_of_the_update() -> None:
    """Sum of what was sent + the residual == sum of the true deltas (telescoping), to rounding."""
    step = CompressStep("topk", topk_fraction=0.05)
    sent = {k: np.zeros_like(v) for k, v in DELTA.items()}
    true = {k: np.zeros_like(v) for k, v in DELTA.items()}
    r = np.random.default_rng(1)
    for _ in range(30):
        delta = {k: r.standard_normal(v.shape).astype(np.float32) for k, v in DELTA.items()}
        out = step(Release(delta, 1, 0.0))
        assert out.wire is not None
        for k in DELTA:
            sent[k] += out.delta[k]
            true[k] += delta[k]
            assert np.count_nonzero(out.delta[k]) <= np.ceil(0.05 * DELTA[k].size)
    assert step.residual is not None
    for k in DELTA:
        np.testing.assert_allclose(sent[k] + step.residual[k], true[k], atol=1e-4)


def test_compression_runs_after_clip_and_noise() -> None:
    acc = PrivacyAccountant(1e-5)
    steps = build_pipeline(PrivacyConfig(clip_norm=1.0, noise_multiplier=0.5), rng, acc, compression="int8")
    assert [type(s).__name__ for s in steps] == ["ClipStep", "GaussianNoiseStep", "CompressStep"]
    assert [type(s).__name__ for s in build_pipeline(PrivacyConfig(enabled=False), rng, None)] == []


def test_config_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"agent\.compression"):
        AgentConfig(compression="zip").validate()
    with pytest.raises(ConfigError, match=r"agent\.topk_fraction"):
        AgentConfig(compression="topk", topk_fraction=0).validate()


async def test_with_the_dp_check_on_int8_passes_and_topk_is_refused_as_not_private() -> None:
    """Quantization keeps the noise's norm; a top-k update no longer shows it, so it is refused."""
    from tests.test_seams import Recorder, feed, make_service

    svc = make_service(dp_noise_multiplier=1.0, dp_clip_norm=1.0)
    assert svc.core is not None
    r = np.random.default_rng(3)
    outcomes = {}
    for i, method in enumerate(("int8", "topk")):
        noisy = {k: r.normal(0, 1.0, v.shape).astype(np.float32) for k, v in svc.core.weights.items()}
        wire = {k: compress(method, v, topk_fraction=0.05) for k, v in noisy.items()}
        seen = {k: dense(w).astype(np.float32) for k, w in wire.items()}
        rec = Recorder()
        await feed(svc, rec, f"a{i}", UpdateMessage(f"a{i}", 1, 0, 5, seen, wire=wire).to_bytes())
        outcomes[method] = (rec.receipts()[0].status, rec.receipts()[0].reason)
    assert outcomes == {"int8": ("accepted", None), "topk": ("rejected", "not_private")}
