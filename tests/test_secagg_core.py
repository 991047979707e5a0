"""Secure aggregation inside the aggregator core: one FedBuff step per cohort, receipts, the log, restarts."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from aggregator.core import AggregatorCore, FedBuffRule, Rejected
from fedmq.config import AggregatorConfig
from fedmq.errors import ConfigError, RejectReason
from fedmq.messages import UpdateMessage
from fedmq.secagg.client import Aborted
from fedmq.secagg.messages import DoneMsg, MaskedMsg, decode_down
from fedmq.secagg.quantize import scale_for
from fedmq.secagg.server import CohortManager, SecAggSettings
from fedmq.staleness import constant
from tests.cipher_rng import CipherRng
from tests.secagg_pair import CoreFleet

SETTINGS = SecAggSettings(cohort_size=10, overselect=0.2, threshold=0.6, timeout=5.0)


def make_core(
    settings: SecAggSettings = SETTINGS, *, server_lr: float = 1.0, momentum: float = 0.0, **kw: Any
) -> AggregatorCore:
    rng = CipherRng(0)
    weights = {"w": rng.normal(0, 1, (20, 5)).astype(np.float32), "b": np.zeros(5, np.float32)}
    n = sum(v.size for v in weights.values())
    rule = FedBuffRule(settings.cohort_size, constant, server_lr=server_lr, momentum=momentum)
    return AggregatorCore(
        weights, rule, run_id="ab" * 8, secagg=CohortManager(settings, n_values=n + 1), checkpoint_every=0, **kw
    )


def clipped(delta: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    norm = float(np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in delta.values())))
    return {k: v * min(1.0, 1.0 / norm) for k, v in delta.items()}


def test_a_cohort_makes_one_fedbuff_step_with_the_mean_of_its_updates() -> None:
    core = make_core()
    before = {k: v.copy() for k, v in core.weights.items()}
    fleet = CoreFleet(core, 12)
    fleet.check_in()
    assert core.version == 1 and core.stats.cohorts_applied == 1 and core.stats.accepted == 10
    receipts = [r for r in fleet.receipts if r.status == "accepted"]
    assert sorted(r.index for r in receipts) == list(range(1, 11)) and {r.version for r in receipts} == {1}
    contributors = {r.agent_id for r in receipts}
    mean = {k: np.mean([clipped(fleet.deltas[a])[k] for a in contributors], axis=0) for k in before}
    scale = scale_for(32, SETTINGS.params.clip_range, 12)
    for k in before:
        assert np.allclose(core.weights[k], before[k] + mean[k], atol=10 / scale + 1e-6)
    kinds = [next(iter(e)) for e in fleet.log]
    assert kinds == ["sa_open", "sa_apply"]


def test_replaying_the_log_rebuilds_the_model_bit_for_bit() -> None:
    core = make_core(momentum=0.5)
    fleet = CoreFleet(core, 12)
    for _ in range(3):
        fleet.check_in()
    assert core.version == 3
    fresh = make_core(momentum=0.5)
    for event in fleet.log:
        fresh.replay("event", event=event, now=0.0)
    for k, v in core.weights.items():
        assert np.array_equal(fresh.weights[k], v)
    replayed, live = fresh.stats.to_dict(), core.stats.to_dict()
    assert replayed.pop("retried") == {} and live.pop("retried")  # flow control is not logged
    assert replayed == live
    for r in fleet.receipts:
        assert fresh.receipt_for(r.agent_id, r.seq) == (r.version, r.index)


def test_a_checkpoint_then_the_rest_of_the_log_rebuilds_it_too() -> None:
    core = make_core()
    fleet = CoreFleet(core, 12)
    fleet.check_in()
    state = core.state_dict()
    mark = len(fleet.log)
    fleet.check_in()
    fresh = make_core()
    fresh.load_state_dict(state)
    for event in fleet.log[mark:]:
        fresh.replay("event", event=event, now=0.0)
    assert fresh.version == core.version == 2
    assert all(np.array_equal(fresh.weights[k], v) for k, v in core.weights.items())


def test_a_restart_abandons_the_cohorts_in_flight_and_their_devices_start_again() -> None:
    settings = dataclasses.replace(SETTINGS, cohort_size=12, overselect=0.0)
    core = make_core(settings)
    fleet = CoreFleet(core, 12)
    fleet.die_before["dev-03"] = "sa_masked"  # no Will: the cohort waits in its upload round
    fleet.check_in()
    (cohort,) = core.open_cohorts
    assert core.secagg is not None and core.secagg.cohorts[cohort].phase == "collecting_inputs"
    state, log = core.state_dict(), list(fleet.log)
    restarted = make_core(settings)  # kill -9 here: a new process from the checkpoint and the log
    restarted.load_state_dict(state)
    for event in log:
        restarted.replay("event", event=event, now=0.0)
    assert restarted.open_cohorts == {cohort: tuple(fleet.agents)}
    fleet.core = restarted
    fleet.dead.clear()
    fleet.die_before.clear()
    fleet.effects(restarted.abandon_open_cohorts(fleet.now, "the aggregator restarted"))
    fleet.pump()
    assert restarted.open_cohorts == {} and restarted.stats.cohorts_abandoned == 1 and restarted.version == 0
    assert fleet.log[-1] == {"sa_close": cohort, "reason": "the aggregator restarted"}
    assert all(isinstance(fleet.sessions[a].state, Aborted) for a in fleet.agents)
    fleet.check_in()  # they check in again: a new cohort, a new sum
    assert restarted.version == 1 and restarted.stats.cohorts_applied == 1


def test_an_applied_upload_sent_again_gets_its_receipt_and_is_not_summed_twice() -> None:
    core = make_core()
    sent: list[MaskedMsg] = []
    fleet = CoreFleet(core, 12)
    original_send = fleet._send

    def spy(agent: str, sends: list) -> None:  # type: ignore[type-arg]
        sent.extend(o.message for o in sends if isinstance(o.message, MaskedMsg))
        original_send(agent, sends)

    fleet._send = spy  # type: ignore[method-assign]
    fleet.check_in()
    applied = next(m for m in sent if core.receipt_for(m.agent_id, m.seq) is not None)
    fleet.receipts.clear()
    refused, effects = core.secagg_message(applied.agent_id, applied, now=fleet.now)
    assert [r.reason for r in refused] == [RejectReason.LATE_UPLOAD]  # its cohort ended: flow control
    fleet.effects(effects)
    (again,) = fleet.receipts
    assert (again.status, again.seq, (again.version, again.index)) == (
        "accepted", applied.seq, core.receipt_for(applied.agent_id, applied.seq)
    )  # fmt: skip
    # ... and in a new cohort, the same seq is a duplicate: the cohort goes on without it
    version = core.version
    fleet.fixed_seq[applied.agent_id] = applied.seq  # its outbox still holds it (the receipt was lost)
    fleet.check_in()
    assert core.version == version + 1
    assert core.stats.duplicates == 1 and not core.stats.rejected  # an outbox re-send: nobody's fault
    assert core.stats.accepted == 20  # ten per cohort: the repeat was not summed again


def test_plain_updates_are_refused_unseen() -> None:
    core = make_core()
    update = UpdateMessage("dev-00", 1, 0, 8, {k: np.zeros_like(v) for k, v in core.weights.items()})
    result = core.receive(update, topic_agent_id="dev-00", now=1.0)
    assert isinstance(result, Rejected) and result.reason is RejectReason.SECURE_AGGREGATION_REQUIRED
    (receipt,) = [e.receipt for e in result.effects]  # type: ignore[union-attr]
    assert receipt.status == "rejected" and receipt.reason == "secure_aggregation_required"
    assert core.version == 0


def test_stale_or_unknown_bases_are_refused() -> None:
    core = make_core()
    core.max_staleness = 0
    future = MaskedMsg("a" * 32, "dev-00", 1, 5, b"")
    refused = core._admit_masked("dev-00", future)
    assert refused is not None and refused.reason is RejectReason.UNKNOWN_BASE_VERSION
    core.version = 3
    stale = MaskedMsg("a" * 32, "dev-00", 1, 2, b"")
    refused = core._admit_masked("dev-00", stale)
    assert refused is not None and refused.reason is RejectReason.TOO_STALE


def test_the_devices_learn_whether_their_upload_was_summed() -> None:
    dones = {}
    core2 = make_core()
    fleet2 = CoreFleet(core2, 12)
    original = fleet2.effects

    def keep(effects: object) -> None:
        for e in effects:  # type: ignore[attr-defined]
            if hasattr(e, "payload"):
                msg = decode_down(e.payload)
                if isinstance(msg, DoneMsg):
                    dones[e.agent] = msg
        original(effects)

    fleet2.effects = keep  # type: ignore[method-assign]
    fleet2.check_in()
    receipted = {r.agent_id for r in fleet2.receipts}
    assert len(receipted) == 10  # a summed upload is answered by its receipt alone
    assert set(dones) == set(fleet2.agents) - receipted  # the others hear that it was applied without them
    assert all(d.status == "applied" and d.included is False for d in dones.values())


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"rule": "fedasync"}, "aggregator.rule"),
        ({"robust": "krum"}, "aggregator.robust"),
        ({"robust": "median"}, "aggregator.robust"),
        ({"norm_bound": 1.0}, "aggregator.norm_bound"),
        ({"dp_noise_multiplier": 1.0}, "aggregator.dp_noise_multiplier"),
    ],
)
def test_the_config_refuses_what_secure_aggregation_makes_meaningless(changes: dict, key: str) -> None:  # type: ignore[type-arg]
    config = AggregatorConfig(secure_aggregation=True, **changes)
    with pytest.raises(ConfigError) as err:
        config.validate()
    assert err.value.key == key
    if key == "aggregator.robust":
        assert "needs individual updates" in str(err.value)


def test_secagg_settings_are_validated_by_key() -> None:
    from fedmq.config import SecAggConfig

    for field, value in (("threshold", 0.5), ("bits", 8), ("degree", 3), ("timeout", 0.0)):
        with pytest.raises(ConfigError) as err:
            SecAggConfig(**{field: value}).validate()
        assert err.value.key == f"aggregator.secagg.{field}"


def test_a_device_at_its_participation_cap_joins_no_cohort_even_without_checking_in() -> None:
    """After a sum, its devices wait in the pool for the next cohort without a check-in: the cap
    (checked at check-in) must hold for them too, or a capped device's next upload is charged."""
    from aggregator.privacy import FederationLedger
    from fedmq.secagg.messages import Params

    params = Params(clip_norm=1.0, dp_stddev=0.05, dp_survivors=8)
    settings = dataclasses.replace(SETTINGS, params=params)
    core = make_core(settings, ledger=FederationLedger(1e-5), max_participation=1)
    fleet = CoreFleet(core, 12)
    fleet.check_in()
    assert core.version == 1 and core.ledger is not None
    spent = {a for a in fleet.agents if core.ledger.count(a) == 1}
    assert len(spent) == 10
    for _ in range(3):
        fleet.check_in()
        fleet.advance(30.0)
    assert max(core.ledger.count(a) for a in fleet.agents) == 1, "a capped device was charged again"
    assert core.version == 1
