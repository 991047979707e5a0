"""The aggregator's privacy: central DP's noised mean, the federation's ledger, the participation cap.

Pure parts against numpy and dp-accounting oracles; the core and the service with the ledger in
their checkpointed state (a crash and a replay give the same epsilon).
"""

from __future__ import annotations

import math
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp as dp_rdp
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.core import AggregatorCore, FedBuffRule, Rejected
from aggregator.privacy import CentralGaussian, FederationLedger, calibrate_gaussian, history_epsilon
from aggregator.rules.central_dp import clip_factor, noised_mean
from fedmq.errors import RejectReason
from fedmq.messages import UpdateMessage
from fedmq.secagg import ddp
from fedmq.secagg.messages import CheckIn
from fedmq.staleness import make_staleness_fn
from tests.test_secagg_service import Clock, Devices, crash_and_restart, make_service

SHAPES = {"b": (3,), "w": (4, 3)}


def deltas(n: int, seed: int = 0, scale: float = 1.0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{k: (scale * rng.normal(size=s)).astype(np.float32) for k, s in SHAPES.items()} for _ in range(n)]


def norm(d: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in d.values()))


# --- central DP: the rule ------------------------------------------------------------------------
def test_noised_mean_without_noise_is_the_clipped_weighted_sum_over_k() -> None:
    ds, ws = deltas(5, scale=2.0), [1.0, 0.5, 0.25, 1.0, 0.7]
    out = noised_mean(ds, ws, clip=1.5, stddev=0.0, rng=np.random.default_rng(0))
    for k in SHAPES:
        oracle = sum(w * min(1.0, 1.5 / norm(d)) * d[k].astype(np.float64) for d, w in zip(ds, ws, strict=True)) / 5
        np.testing.assert_allclose(out[k], oracle, rtol=1e-5, atol=1e-6)
        assert out[k].dtype == np.float32


def test_noised_mean_adds_noise_of_the_stated_deviation_once_per_sum() -> None:
    zero = [{k: np.zeros(s, np.float32) for k, s in SHAPES.items()} for _ in range(4)]
    big = {"w": (200, 100)}
    zeros = [{k: np.zeros(s, np.float32) for k, s in big.items()} for _ in range(4)]
    out = noised_mean(zeros, [1.0] * 4, clip=1.0, stddev=2.0, rng=np.random.default_rng(1))
    assert float(np.std(out["w"])) == pytest.approx(2.0 / 4, rel=0.03)  # N(0, 2^2) on the sum, / K
    assert clip_factor(zero[0], 1.0) == 1.0  # a zero delta: no division by a zero norm


@pytest.mark.parametrize(
    ("weights", "kw", "match"),
    [
        ([1.5, 1.0], {}, "weights must be in"),
        ([0.0, 1.0], {}, "weights must be in"),
        ([1.0, 1.0], {"clip": 0.0}, "clip"),
        ([1.0, 1.0], {"stddev": float("nan")}, "stddev"),
    ],
)
def test_noised_mean_validates_its_preconditions(weights: list[float], kw: dict[str, float], match: str) -> None:
    args: dict[str, float] = {"clip": 1.0, "stddev": 1.0, **kw}
    with pytest.raises(ValueError, match=match):
        noised_mean(deltas(2), weights, rng=np.random.default_rng(0), **args)


def test_a_non_finite_delta_is_refused_not_clipped_into_nan() -> None:
    bad = deltas(2)
    bad[1]["w"][0, 0] = np.inf
    with pytest.raises(ValueError, match="not finite"):
        noised_mean(bad, [1.0, 1.0], clip=1.0, stddev=1.0, rng=np.random.default_rng(0))


@settings(max_examples=30, deadline=None)
@given(st.floats(0.1, 10.0), st.integers(0, 2**31))
def test_one_device_moves_the_noiseless_sum_by_at_most_the_clip(clip: float, seed: int) -> None:
    """The sensitivity the accounting charges for: adding any one delta moves K * mean by <= C."""
    ds = deltas(4, seed, scale=5.0)
    rng = np.random.default_rng(0)
    with_all = noised_mean(ds, [1.0] * 4, clip=clip, stddev=0.0, rng=rng)
    without = noised_mean(ds[:3], [1.0] * 3, clip=clip, stddev=0.0, rng=rng)
    diff = {k: 4 * with_all[k].astype(np.float64) - 3 * without[k].astype(np.float64) for k in SHAPES}
    assert norm(diff) <= clip * (1 + 1e-4)


# --- accounting ---------------------------------------------------------------------------------
def test_gaussian_history_matches_dp_accounting() -> None:
    for z, n in [(1.0, 1), (2.0, 10), (4.5, 50)]:
        acc = dp_rdp.RdpAccountant()
        acc.compose(dp_accounting.GaussianDpEvent(z), n)
        assert history_epsilon(((("gaussian", z), n),), 1e-5) == pytest.approx(acc.get_epsilon(1e-5))


@pytest.mark.parametrize("releases", [1, 10, 50])
def test_calibrate_gaussian_meets_the_target_from_below(releases: int) -> None:
    z = calibrate_gaussian(8.0, 1e-5, releases)
    eps = history_epsilon(((("gaussian", z), releases),), 1e-5)
    assert 7.9 <= eps <= 8.0
    assert history_epsilon(((("gaussian", z * 0.97), releases),), 1e-5) > 8.0


def test_the_ledger_reports_the_largest_epsilon_and_survives_its_state() -> None:
    ledger = FederationLedger(1e-5)
    p = ddp.cohort_params(stddev=20.0, survivors=8, clip_norm=1.0, beta=math.exp(-0.5), bits=32, members=12, dim=51)
    ledger.record(["a", "b"], ("gaussian", 2.0))
    ledger.record(["a"], ("gaussian", 2.0))
    ledger.record(["c"], p)
    assert ledger.count("a") == 2 and ledger.count("b") == 1 and ledger.count("nobody") == 0
    eps_a = history_epsilon(((("gaussian", 2.0), 2),), 1e-5)
    eps_c = ddp.epsilon(ddp.rdp(p), 1e-5)
    assert ledger.epsilon("a") == pytest.approx(eps_a) and ledger.epsilon("c") == pytest.approx(eps_c)
    assert ledger.max_epsilon == pytest.approx(max(eps_a, eps_c, ledger.epsilon("b")))
    again = FederationLedger(1e-5)
    again.load_state_dict(ledger.state_dict())
    assert again.releases == ledger.releases and again.max_epsilon == pytest.approx(ledger.max_epsilon)


# --- the core: central DP and the cap -------------------------------------------------------------
def central_core(cap: int = 0, k: int = 3) -> AggregatorCore:
    weights = {k_: np.zeros(s, np.float32) for k_, s in SHAPES.items()}
    agg = CentralGaussian(1.0, 2.0)  # a fresh OS key, as the service makes
    rule = FedBuffRule(k, make_staleness_fn("polynomial", 0.5), aggregate=agg)
    return AggregatorCore(
        weights, rule, rate_limit=0.0, ledger=FederationLedger(1e-5), central_dp=2.0, max_participation=cap
    )


def send(core: AggregatorCore, agent: str, seq: int) -> object:
    d = deltas(1, seed=seq)[0]
    return core.receive(UpdateMessage(agent, seq, core.version, 10, d), topic_agent_id=agent, now=float(seq))


def test_each_central_step_charges_the_devices_in_it() -> None:
    core = central_core()
    for i, a in enumerate(["a", "b", "c", "a", "b", "d"]):
        send(core, a, i + 1)
    assert core.version == 2
    assert core.ledger is not None and core.ledger.count("a") == 2 and core.ledger.count("d") == 1
    assert core.stats.max_epsilon == pytest.approx(history_epsilon(((("gaussian", 2.0), 2),), 1e-5))
    restored = central_core()
    restored.load_state_dict(core.state_dict())
    assert restored.ledger is not None and restored.ledger.releases == core.ledger.releases


def test_a_replay_after_a_checkpoint_reproduces_the_noise_so_no_sum_is_released_twice() -> None:
    """After a crash the log is replayed through the rule: the same sums must get the same noise.

    Fresh noise would publish a second, independent noising of sums already published, and the
    average of the two carries half the noise variance the ledger charged for."""
    core = central_core()
    for i, a in enumerate(["a", "b", "c"]):
        send(core, a, i + 1)
    checkpoint = core.state_dict()
    for i, a in enumerate(["d", "e", "f", "a"]):
        send(core, a, 10 + i)
    assert core.version == 2
    restarted = central_core()  # a new process: a new key until the checkpoint is loaded
    restarted.load_state_dict(checkpoint)
    for i, a in enumerate(["d", "e", "f", "a"]):
        d = deltas(1, seed=10 + i)[0]
        restarted.replay("update", update=UpdateMessage(a, 10 + i, 1, 10, d), agent_id=a)
    assert restarted.version == 2
    for k, v in core.weights.items():
        np.testing.assert_array_equal(restarted.weights[k], v)
    fresh = central_core()  # without the checkpoint's key, the same sums get other noise
    for i, a in enumerate(["a", "b", "c"]):
        send(fresh, a, i + 1)
    assert fresh.version == 1 and not all(np.array_equal(fresh.weights[k], v) for k, v in checkpoint["weights"].items())


def test_the_participation_cap_refuses_a_device_whose_sums_are_spent() -> None:
    core = central_core(cap=1, k=2)
    send(core, "a", 1)
    send(core, "b", 2)  # the first sum: a and b spent
    assert core.version == 1
    refused = send(core, "a", 3)
    assert isinstance(refused, Rejected) and refused.reason is RejectReason.PARTICIPATION_CAP
    send(core, "c", 4)
    refused_pending = send(core, "c", 5)  # c's first is in the open buffer: a second would pass the cap
    assert isinstance(refused_pending, Rejected) and refused_pending.reason is RejectReason.PARTICIPATION_CAP
    assert core.stats.rejected["participation_cap"] == 2


def test_a_minimum_separation_spaces_a_devices_sums_and_asks_it_to_retry() -> None:
    weights = {k_: np.zeros(s, np.float32) for k_, s in SHAPES.items()}
    rule = FedBuffRule(2, make_staleness_fn("constant"), aggregate=CentralGaussian(1.0, 2.0, key=bytes(32)))
    core = AggregatorCore(
        weights, rule, rate_limit=0.0, ledger=FederationLedger(1e-5), central_dp=2.0, min_separation=2
    )
    send(core, "a", 1)
    send(core, "b", 2)
    assert core.version == 1 and core.ledger is not None and core.ledger.last["a"] == 1

    def window(result: object) -> bool:
        return isinstance(result, Rejected) and result.reason is RejectReason.PARTICIPATION_WINDOW

    assert window(send(core, "a", 3))  # in the sum that made version 1: not before version 3
    send(core, "c", 4)
    assert window(send(core, "c", 5))  # one waiting in the buffer already
    send(core, "d", 6)
    assert core.version == 2 and window(send(core, "a", 7))
    send(core, "e", 8)
    send(core, "f", 9)
    assert core.version == 3
    accepted = send(core, "a", 10)
    assert not isinstance(accepted, Rejected)
    assert core.stats.retried["participation_window"] == 3 and not core.stats.rejected
    assert not isinstance(send(core, "b", 11), Rejected)  # b's sum made version 1 too: 3 - 1 >= 2
    assert core.version == 4 and core.ledger.last["a"] == core.ledger.last["b"] == 4
    restored = central_core()
    restored.load_state_dict(core.state_dict())
    assert restored.ledger is not None and restored.ledger.last == core.ledger.last


def test_central_dp_and_a_cap_need_a_ledger() -> None:
    rule = FedBuffRule(2, make_staleness_fn("constant"))
    with pytest.raises(ValueError, match="ledger"):
        AggregatorCore({"b": np.zeros(3, np.float32)}, rule, central_dp=1.0)


# --- the service: distributed DP in cohorts, through a crash --------------------------------------
async def test_distributed_dp_cohorts_are_charged_capped_and_survive_a_crash(tmp_path: Path) -> None:
    from fedmq.config import SecAggConfig

    clock = Clock()
    dp = {"secagg": SecAggConfig(overselect=0.2, timeout=5.0, dp_epsilon=8.0), "max_participation": 2}
    svc = make_service(tmp_path, clock, **dp)
    params = svc._secagg_params
    assert params is not None and params.distributed_dp and params.dp_survivors == 8
    devices = Devices(svc, clock)
    await devices.check_in()
    await devices.run_until(None)
    core = svc.core
    assert core is not None and core.version == 1 and core.ledger is not None
    summed = [a for a in devices.agents if core.ledger.count(a) == 1]
    assert len(summed) == 10
    one = core.stats.max_epsilon
    assert 0 < one < 8.0
    # The second cohort: the ten summed are back in the pool, the two late ones check in again.
    await next_cohort(devices)
    assert core.version == 2
    assert one < core.stats.max_epsilon <= 8.0 + 1e-6
    # A crash: the ledger comes back from the checkpoint and the log, with the same epsilon.
    svc2 = await crash_and_restart(devices, tmp_path, clock)
    assert svc2.core is not None and svc2.core.ledger is not None
    assert svc2.core.ledger.releases == core.ledger.releases
    assert svc2.core.stats.max_epsilon == pytest.approx(core.stats.max_epsilon)
    # Devices in two sums (the cap) are refused further cohorts; the rest are not.
    spent = {a for a in devices.agents if svc2.core.ledger.count(a) >= 2}
    assert len(spent) >= 8
    devices.expire()
    await devices.check_in()
    assert svc2.core.stats.rejected["participation_cap"] == len(spent)
    assert svc2.core.secagg is not None
    waiting = set(svc2.core.secagg.pool) | set(svc2.core.secagg.member_of)
    assert waiting == set(devices.agents) - spent


async def next_cohort(devices: Devices) -> None:
    """Train, let the two devices left out of the last sum check in, and wait out form_wait."""
    svc = devices.svc
    assert svc.core is not None and svc.core.secagg is not None
    pooled = set(svc.core.secagg.pool)
    for a in devices.agents:
        devices.stage(a)
        if a not in pooled:
            await svc.handle(svc.topics.secagg_up(a), CheckIn(a).to_bytes())
    devices.clock.t += svc.cfg.secagg.form_wait + 0.1
    await svc.tick()
    await devices.run_until(None)
