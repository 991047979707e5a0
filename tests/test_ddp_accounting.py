"""The distributed discrete Gaussian's accounting (fedmq/secagg/ddp.py) against dp-accounting and the paper."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmq.secagg.ddp import ORDERS, DdgLedger, DdgParams, epsilon, rdp, rounded_l2_bound, tau


def gaussian_epsilon(z: float, releases: int, delta: float) -> float:
    import dp_accounting
    from dp_accounting import rdp as rdp_lib

    acc = rdp_lib.RdpAccountant(orders=[float(a) for a in ORDERS])
    acc.compose(dp_accounting.GaussianDpEvent(z), releases)
    return float(acc.get_epsilon(delta))


def test_tau_by_hand() -> None:
    assert tau(1.0, 1) == 0.0  # one device: its noise is exactly a discrete Gaussian
    assert tau(1.0, 2) == pytest.approx(10 * math.exp(-(math.pi**2)), rel=1e-12)
    three = 10 * (math.exp(-2 * math.pi**2 * 4 * 0.5) + math.exp(-2 * math.pi**2 * 4 * 2 / 3))
    assert tau(2.0, 3) == pytest.approx(three, rel=1e-12)


def test_rounded_l2_bound() -> None:
    assert rounded_l2_bound(100.0, 400, 0.0) == pytest.approx(120.0)
    b = math.exp(-0.5)
    expected = math.sqrt(100**2 + 400 / 4 + math.sqrt(2 * 0.5) * (100 + 20 / 2))
    assert rounded_l2_bound(100.0, 400, b) == pytest.approx(expected)
    assert rounded_l2_bound(100.0, 400, b) < 120.0  # conditional rounding is the tighter one here
    with pytest.raises(ValueError):
        rounded_l2_bound(1.0, 10, 1.0)


def test_in_the_gaussian_limit_it_is_dp_accountings_gaussian() -> None:
    """Fine quantization and large integer noise: tau vanishes and rounding adds almost nothing,
    so each release is a Gaussian of multiplier central_stddev / clip."""
    p = DdgParams(clip=1.0, gamma=1e-5, local_stddev=0.5, survivors=16, dim=10, beta=0.0)
    assert tau(p.sigma, p.survivors) < 1e-300
    z = p.central_stddev / p.clip  # 2.0
    for releases in (1, 10, 100):
        ours = epsilon(releases * rdp(p), 1e-5)
        ref = gaussian_epsilon(z, releases, 1e-5)
        assert ref <= ours <= ref * 1.01, (releases, ours, ref)


def test_coarse_quantization_costs_privacy() -> None:
    """Rounding grows the sensitivity; few integer levels of noise make tau count."""
    fine = DdgParams(clip=1.0, gamma=1e-4, local_stddev=0.25, survivors=8, dim=1000)
    coarse = DdgParams(clip=1.0, gamma=0.1, local_stddev=0.25, survivors=8, dim=1000)
    assert epsilon(rdp(coarse), 1e-5) > epsilon(rdp(fine), 1e-5)
    assert tau(coarse.sigma, coarse.survivors) > tau(fine.sigma, fine.survivors)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 200), z=st.floats(0.3, 5.0), dim=st.integers(1, 10_000), gamma=st.floats(1e-4, 1e-2))
def test_more_survivors_more_releases_and_more_noise_move_epsilon_the_right_way(
    n: int, z: float, dim: int, gamma: float
) -> None:
    local = z / math.sqrt(n)  # central noise multiplier z at n survivors
    p = DdgParams(clip=1.0, gamma=gamma, local_stddev=local, survivors=n, dim=dim)
    one, two = epsilon(rdp(p), 1e-5), epsilon(2 * rdp(p), 1e-5)
    assert 0 < one < two
    noisier = DdgParams(clip=1.0, gamma=gamma, local_stddev=2 * local, survivors=n, dim=dim)
    assert epsilon(rdp(noisier), 1e-5) < one
    # Fewer survivors than planned (dropouts below the threshold) means less noise in the sum.
    if n > 1:
        fewer = DdgParams(clip=1.0, gamma=gamma, local_stddev=local, survivors=n - 1, dim=dim)
        assert epsilon(rdp(fewer), 1e-5) > one
    # Never better than the continuous Gaussian of the same central noise.
    assert one >= gaussian_epsilon(p.central_stddev / p.clip, 1, 1e-5) * (1 - 1e-9)


def test_ledger_composes_and_round_trips_as_data() -> None:
    a = DdgParams(clip=1.0, gamma=1e-3, local_stddev=0.3, survivors=10, dim=100)
    b = DdgParams(clip=2.0, gamma=1e-3, local_stddev=0.6, survivors=10, dim=100)
    ledger = DdgLedger.empty()
    assert ledger.epsilon(1e-5) == 0.0
    ledger.record(a, 3)
    ledger.record(b)
    ledger.record(a)
    assert ledger.releases == {a: 4, b: 1}
    assert np.allclose(ledger.curve(), 4 * rdp(a) + rdp(b))
    again = DdgLedger.from_state(ledger.to_state())
    assert again.releases == ledger.releases and again.epsilon(1e-5) == ledger.epsilon(1e-5)
    with pytest.raises(ValueError):
        DdgLedger.from_state([{**a.__dict__, "count": 1.5}])
    with pytest.raises(ValueError):
        DdgLedger.from_state([{**a.__dict__, "count": 1, "survivors": 0}])


@pytest.mark.parametrize(
    "bad",
    [
        {"clip": 0.0},
        {"gamma": -1.0},
        {"local_stddev": float("nan")},
        {"survivors": 0},
        {"dim": 0},
        {"beta": 1.0},
    ],
)
def test_params_validate_their_domain(bad: dict[str, float]) -> None:
    good = {"clip": 1.0, "gamma": 1e-3, "local_stddev": 0.3, "survivors": 10, "dim": 100}
    with pytest.raises(ValueError):
        DdgParams(**{**good, **bad})  # type: ignore[arg-type]


def test_epsilon_validates_delta() -> None:
    p = DdgParams(clip=1.0, gamma=1e-3, local_stddev=0.3, survivors=10, dim=100)
    with pytest.raises(ValueError, match="delta"):
        epsilon(rdp(p), 0.0)


def gaussian_multiplier(target: float, releases: int, delta: float) -> float:
    import dp_accounting
    from dp_accounting import rdp as rdp_lib

    return float(
        dp_accounting.calibrate_dp_mechanism(
            lambda: rdp_lib.RdpAccountant(orders=[float(a) for a in ORDERS]),
            lambda z: dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), releases),
            target,
            delta,
            bracket_interval=dp_accounting.ExplicitBracketInterval(0.1, 100.0),
        )
    )


@pytest.mark.parametrize(("target", "releases"), [(8.0, 50), (2.0, 10), (8.0, 1)])
def test_calibration_meets_the_target_tightly_and_nears_the_gaussian_at_32_bits(target: float, releases: int) -> None:
    from fedmq.secagg.ddp import calibrate, step_for

    c = calibrate(target, 1e-5, releases=releases, survivors=60, summands=100, dim=26_506, clip=1.0)
    assert 0.99 * target <= c.epsilon <= target
    z_gauss = gaussian_multiplier(target, releases, 1e-5)
    assert z_gauss <= c.noise_multiplier <= 1.05 * z_gauss  # discreteness costs under 5 % of noise here
    p = c.params
    assert p.gamma == pytest.approx(step_for(32, 1.0, 100, p.local_stddev))
    # The sum of 100 clipped updates plus 4 standard deviations of noise fits the signed ring.
    assert (100 * 1.0 + 4 * 10 * p.local_stddev) / p.gamma <= 2**31 - 1 + 1e-6


def test_calibration_says_when_the_bits_cannot_reach_the_target() -> None:
    from fedmq.secagg.ddp import calibrate

    with pytest.raises(ValueError, match="use more bits"):
        calibrate(8.0, 1e-5, releases=50, survivors=60, summands=100, dim=26_506, clip=1.0, bits=8)
    with pytest.raises(ValueError, match="summands >= survivors"):
        calibrate(8.0, 1e-5, releases=5, survivors=60, summands=10, dim=100, clip=1.0)


def test_one_device_is_the_discrete_gaussians_zcdp_in_dp_accounting() -> None:
    """Canonne, Kamath, Steinke (NeurIPS 2020, Thm. 4): one discrete Gaussian of variance sigma^2 with
    L2 sensitivity D is (D^2 / 2 sigma^2)-zCDP, exactly as the continuous one. With one device tau
    is 0 and Proposition 14 reduces to that, so our epsilon must equal dp-accounting's for the
    ZCDpEvent, composed the same number of times."""
    import dp_accounting
    from dp_accounting import rdp as dp_rdp

    p = DdgParams(clip=1.0, gamma=0.01, local_stddev=0.8, survivors=1, dim=50, beta=0.0)
    assert tau(p.sigma, 1) == 0.0
    sensitivity = rounded_l2_bound(p.clip / p.gamma, p.dim, p.beta)
    rho = sensitivity**2 / (2 * p.sigma**2)
    for releases in (1, 20):
        acc = dp_rdp.RdpAccountant(list(ORDERS))
        acc.compose(dp_accounting.ZCDpEvent(rho), releases)
        assert epsilon(releases * rdp(p), 1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)


def test_a_sum_of_few_small_discrete_gaussians_costs_more_than_one_of_the_same_variance() -> None:
    """Proposition 14's gap: a sum of n discrete Gaussians is not a discrete Gaussian; at small sigma
    the tau terms make the bound larger than the zCDP of a single one of variance n sigma^2, and
    the gap closes as sigma grows (tau falls like exp(-pi^2 sigma^2))."""
    import dp_accounting
    from dp_accounting import rdp as dp_rdp

    n = 8
    ratios = []
    for sigma in (0.3, 0.6, 1.0, 3.0):
        p = DdgParams(clip=1.0, gamma=1.0, local_stddev=sigma, survivors=n, dim=20, beta=0.0)
        sensitivity = rounded_l2_bound(p.clip / p.gamma, p.dim, p.beta)
        acc = dp_rdp.RdpAccountant(list(ORDERS))
        acc.compose(dp_accounting.ZCDpEvent(sensitivity**2 / (2 * n * p.sigma**2)))
        ours, single = epsilon(rdp(p), 1e-5), acc.get_epsilon(1e-5)
        assert ours >= single * (1 - 1e-12)
        ratios.append(ours / single)
    assert ratios[0] > 1.5 and ratios == sorted(ratios, reverse=True) and ratios[-1] == pytest.approx(1.0, abs=1e-6)


def test_a_devices_distributed_ledger_loads_the_rdp_accountant_alone() -> None:
    """A device's first distributed-DP release must not pull all of dp_accounting and SciPy in
    (about 70 MiB): in a fresh interpreter the ledger's epsilon loads only the RDP accountant,
    and equals what the whole package computes."""
    import json
    import subprocess
    import sys

    script = """
import sys, json
from fedmq.secagg.ddp import DdgLedger, DdgParams
ledger = DdgLedger.empty()
ledger.record(DdgParams(clip=1.0, gamma=1e-3, local_stddev=0.5, survivors=8, dim=100), 5)
lite = ledger.epsilon(1e-5)
heavy = sorted(m for m in ("scipy.stats", "scipy.optimize", "scipy.signal", "scipy.special",
                           "dp_accounting.pld") if m in sys.modules)
from dp_accounting.rdp import rdp_privacy_accountant
from fedmq.secagg.ddp import ORDERS
full, _ = rdp_privacy_accountant.compute_epsilon(list(ORDERS), list(ledger.curve()), 1e-5)
print(json.dumps([lite, full, heavy]))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    lite, full, heavy = json.loads(out)
    assert lite == full and 0 < lite < float("inf")
    assert heavy == []
