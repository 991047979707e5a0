"""Distributed DP inside the secure-aggregation protocol: both ends in memory (tests/secagg_pair.py).

Each device adds its share of discrete Gaussian noise before masking; the aggregator learns the
sum of the inputs plus the sum of the shares. Checked against a numpy oracle: the error of the
unmasked sum has the variance the calibration promises, no sum is released with fewer uploads than
the noise is calibrated to (the devices enforce it too), and both ends agree on the release.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from fedmq.errors import DecodeError
from fedmq.secagg import ddg_noise
from fedmq.secagg.ddp import cohort_params, input_clip, weight_scale
from fedmq.secagg.messages import CohortMsg, Params, UnmaskMsg, decode_down
from fedmq.secagg.server import Abandoned, SecAggSettings, Unmasked
from tests.cipher_rng import CipherRng
from tests.secagg_pair import Fleet

DDP = Params(clip_norm=1.0, dp_stddev=2.0, dp_survivors=8)
SETTINGS = SecAggSettings(cohort_size=10, overselect=0.2, threshold=0.6, timeout=5.0, params=DDP)


def ddp_fleet(n_values: int = 2001, settings: SecAggSettings = SETTINGS) -> Fleet:
    fleet = Fleet(12, settings, n_values=n_values)
    rng = CipherRng(7)
    for a in fleet.agents:  # clipped as weighted_input would: ||x|| <= clip_norm
        x = rng.normal(size=n_values - 1)
        fleet.inputs[a] = x / np.linalg.norm(x) * rng.uniform(0.1, 1.0)
    return fleet


def test_the_sum_carries_the_calibrated_noise_and_no_more() -> None:
    fleet = ddp_fleet()
    fleet.check_in()
    result = fleet.results[0]
    assert isinstance(result, Unmasked), result
    contributors = [c.agent for c in result.contributors]
    error = result.values - fleet.expected(contributors)
    release = result.release
    assert release is not None and release.survivors == 8 and release.dim == 2001
    # Each of the 10 uploads carries stddev / sqrt(8): the sum has sqrt(10 / 8) * stddev, plus rounding.
    predicted = math.sqrt(len(contributors)) * release.local_stddev
    assert predicted == pytest.approx(2.0 * math.sqrt(10 / 8))
    assert abs(float(error[:-1].mean())) < 5 * predicted / math.sqrt(2000)
    assert float(error[:-1].std()) == pytest.approx(predicted, rel=0.1)
    # The weights' sum comes back from its scaled coordinate, within its (scaled-up) noise.
    weights = sum(fleet.weights[a] for a in contributors)
    noise_on_weights = predicted / weight_scale(DDP.clip_norm)
    assert abs(ddg_noise.weight_sum(result.values, DDP.clip_norm) - weights) < 5 * noise_on_weights
    # Both ends computed the same release: the devices' ledgers charge what the aggregator reports.
    for a in contributors:
        assert fleet.sessions[a].release == release


def test_both_ends_derive_the_release_from_the_announcement() -> None:
    p = cohort_params(stddev=2.0, survivors=8, clip_norm=1.0, beta=DDP.dp_beta, bits=32, members=12, dim=2001)
    assert p.clip == pytest.approx(input_clip(1.0)) == pytest.approx(math.sqrt(1.01))
    assert p.local_stddev == pytest.approx(2.0 / math.sqrt(8))
    assert p.central_stddev == pytest.approx(2.0)
    # A sum of all 12 members with 4 standard deviations of noise fits the signed 32-bit ring.
    assert (12 * p.clip + 4 * math.sqrt(12) * p.local_stddev) / p.gamma <= 2**31 - 1


def test_too_few_uploads_for_the_noise_abandon_the_cohort() -> None:
    """9 uploads satisfy the threshold t = 8 of 12 holders, but not a noise calibrated to 10 survivors."""
    settings = dataclasses.replace(SETTINGS, params=dataclasses.replace(DDP, dp_survivors=10))
    fleet = ddp_fleet(51, settings)
    for a in fleet.agents[:3]:
        fleet.die_before[a] = "sa_masked"
    fleet.check_in()
    fleet.run_to_end()
    result = fleet.results[0]
    assert isinstance(result, Abandoned) and "9 masked uploads, a sum needs 10" in result.reason


def test_a_device_refuses_to_unmask_a_sum_with_too_little_noise() -> None:
    """An aggregator that asks to unmask fewer uploads than the noise is calibrated to is refused."""

    def shrink(agent: str, msg: object) -> object:
        if isinstance(msg, UnmaskMsg):
            return UnmaskMsg(msg.cohort, msg.survivors[:8], (*msg.dropped, *msg.survivors[8:]))
        return msg

    settings = dataclasses.replace(SETTINGS, params=dataclasses.replace(DDP, dp_survivors=10))
    fleet = ddp_fleet(51, settings)
    fleet.down_filter = shrink  # type: ignore[assignment]
    fleet.check_in()
    refusals = fleet.refusals()
    # 8 named survivors satisfy the threshold t = 8 but not the noise's 10: each refuses to reveal.
    named = [a for a, why in refusals.items() if why == "too_little_noise"]
    assert len(named) == 8 and sorted(refusals.values()).count("bad_unmask") == 2  # the 2 called dropped
    assert not any(isinstance(r, Unmasked) for r in fleet.results)


def test_a_cohort_smaller_than_the_calibration_never_forms() -> None:
    settings = dataclasses.replace(SETTINGS, min_cohort=3, params=dataclasses.replace(DDP, dp_survivors=8))
    fleet = ddp_fleet(51, settings)
    fleet.check_in(fleet.agents[:5])
    fleet.advance(settings.form_wait + 1)
    assert fleet.manager.formed == 0 and len(fleet.manager.pool) == 5


def test_params_carry_distributed_dp_on_the_wire() -> None:
    assert Params.from_wire(DDP.to_wire()) == DDP
    legacy = Params().to_wire()
    for key in ("dp_stddev", "dp_survivors", "dp_beta"):
        del legacy[key]
    assert Params.from_wire(legacy) == Params() and not Params().distributed_dp
    for bad in ({"dp_survivors": 1}, {"dp_stddev": -1.0}, {"dp_beta": 1.0}, {"dp_stddev": float("nan")}):
        with pytest.raises(DecodeError):
            Params.from_wire({**DDP.to_wire(), **bad})
    announce = CohortMsg("c" * 32, ("a", "b", "c"), 2, 2, DDP, 0, 5.0)
    decoded = decode_down(announce.to_bytes())
    assert isinstance(decoded, CohortMsg) and decoded.params == DDP
