"""The secure-aggregation protocol, both ends in memory: sums, dropouts at every phase, hostile input.

Each test drives :class:`tests.secagg_pair.Fleet` (client sessions and a cohort manager, every
message through its wire encoding) and checks what the aggregator learned against a numpy
oracle: the sum of the contributors' weighted inputs, within the quantization bound.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from broker import pki
from fedmq.errors import RejectReason
from fedmq.secagg import crypto
from fedmq.secagg.messages import (
    KeysMsg,
    MaskedMsg,
    Params,
    RelayMsg,
    RevealMsg,
    RosterMsg,
    SharesMsg,
    UnmaskMsg,
    decode_down,
)
from fedmq.secagg.quantize import scale_for
from fedmq.secagg.server import Abandoned, SecAggSettings, Unmasked
from tests.cipher_rng import CipherRng
from tests.secagg_pair import Fleet

SMALL = SecAggSettings(cohort_size=10, overselect=0.2, threshold=0.6, timeout=5.0)  # 12 devices, complete graph


def only_result(fleet: Fleet) -> Unmasked | Abandoned:
    """The first cohort's outcome (its uploaders are back in the pool, and later ticks may form more)."""
    assert fleet.results, "no cohort ended"
    return fleet.results[0]


def check_sum(fleet: Fleet, result: Unmasked | Abandoned) -> list[str]:
    assert isinstance(result, Unmasked), result
    contributors = [c.agent for c in result.contributors]
    scale = scale_for(fleet.settings.params.bits, fleet.settings.params.clip_range, len(result.members))
    assert np.abs(result.values - fleet.expected(contributors)).max() <= len(contributors) / scale
    return contributors


def test_the_aggregator_learns_the_sum_of_the_first_k() -> None:
    fleet = Fleet(12, SMALL)
    fleet.check_in()
    contributors = check_sum(fleet, only_result(fleet))
    assert len(contributors) == 10  # K closes the cohort; the last two count as dropped (their masks removed)
    late = [r for r in fleet.rejects if r.reason is RejectReason.LATE_UPLOAD]
    assert len(late) == 2 and not (set(r.reason for r in fleet.rejects) - {RejectReason.LATE_UPLOAD})
    assert all(fleet.finished(a)[0].status == "applied" for a in fleet.agents)
    assert fleet.manager.applied == 1 and not fleet.manager.cohorts and not fleet.manager.member_of


def test_the_sum_is_exact_mod_2_to_the_bits() -> None:
    """Inputs on the quantization grid quantize exactly: the recovered sum equals the plain one to the bit."""
    fleet = Fleet(12, SMALL)
    scale = scale_for(32, SMALL.params.clip_range, 12)
    rng = CipherRng(3)
    for a in fleet.agents:
        fleet.weights[a] = 1.0
        fleet.inputs[a] = rng.integers(-1000, 1000, fleet.n_values - 1) / scale
    fleet.check_in()
    result = only_result(fleet)
    assert isinstance(result, Unmasked)
    expected = fleet.expected([c.agent for c in result.contributors])
    assert np.array_equal(np.round(result.values * scale), np.round(expected * scale))


def test_a_masked_upload_hides_the_input() -> None:
    """What the aggregator receives from one device is uniform-looking, uncorrelated with the input."""
    uploads: dict[str, MaskedMsg] = {}

    def spy(agent: str, msg: object) -> object:
        if isinstance(msg, MaskedMsg):
            uploads[agent] = msg
        return msg

    fleet = Fleet(12, SMALL, n_values=20_001)
    fleet.up_filter = spy  # type: ignore[assignment]
    fleet.check_in()
    y = np.frombuffer(uploads["dev-00"].data, dtype="<u4").astype(np.float64)
    assert abs(y.mean() / 2**32 - 0.5) < 0.01  # uniform over the ring, not centred on small values
    assert abs(np.corrcoef(y[:-1], fleet.inputs["dev-00"])[0, 1]) < 0.05


# --- dropouts at every phase ------------------------------------------------------------------------
@pytest.mark.parametrize("tell_offline", [True, False], ids=["will", "timeout"])
@pytest.mark.parametrize(
    ("phase", "count"),
    [("sa_keys", 2), ("sa_shares", 2), ("sa_masked", 2), ("sa_reveal", 1)],
    ids=["after-check-in", "after-keys", "after-sharing", "after-upload"],
)
def test_dropouts_at_a_phase_leave_a_correct_sum(phase: str, count: int, tell_offline: bool) -> None:
    fleet = Fleet(12, SMALL)
    fleet.tell_offline = tell_offline
    victims = fleet.agents[:count]
    for a in victims:
        fleet.die_before[a] = phase
    fleet.check_in()
    fleet.run_to_end()
    contributors = check_sum(fleet, only_result(fleet))
    if phase != "sa_reveal":
        assert not set(victims) & set(contributors)
    else:  # uploaded, then vanished during unmasking: its upload counts, its holders reveal its seed
        assert set(victims) <= set(contributors)


def test_too_many_dropouts_during_unmasking_abandon_the_cohort() -> None:
    fleet = Fleet(12, SMALL)  # t = 8 of 12 holders; 10 upload; 3 vanish before revealing: 7 < 8
    for a in fleet.agents[:3]:
        fleet.die_before[a] = "sa_reveal"
    fleet.check_in()
    fleet.run_to_end()
    result = only_result(fleet)
    assert isinstance(result, Abandoned) and "cannot be reconstructed" in result.reason
    assert fleet.manager.abandoned == 1 and fleet.manager.applied == 0
    for a in fleet.agents[3:]:
        assert fleet.finished(a)[-1].status == "abandoned"
    fleet.dead.clear()  # they come back and join a new cohort
    fleet.die_before.clear()
    fleet.check_in()
    assert isinstance(fleet.results[-1], Unmasked)


def test_too_few_uploads_abandon_the_cohort() -> None:
    fleet = Fleet(12, SMALL)
    for a in fleet.agents[:5]:  # 7 uploads < t = 8
        fleet.die_before[a] = "sa_masked"
    fleet.check_in()
    fleet.run_to_end()
    result = only_result(fleet)
    assert isinstance(result, Abandoned) and "7 masked uploads" in result.reason


def test_a_sparse_graph_with_dropouts() -> None:
    settings = SecAggSettings(cohort_size=50, overselect=0.2, threshold=0.6, degree=12, timeout=5.0)
    fleet = Fleet(60, settings)
    for a in fleet.agents[:3]:
        fleet.die_before[a] = "sa_masked"
    for a in fleet.agents[3:5]:
        fleet.die_before[a] = "sa_shares"
    fleet.check_in()
    fleet.run_to_end()
    result = only_result(fleet)
    assert isinstance(result, Unmasked) and len(result.contributors) >= 50
    check_sum(fleet, result)
    cohort = fleet.sessions["dev-10"]
    assert cohort.graph is not None and len(cohort.graph.neighbours["dev-10"]) == 12


def test_cohorts_run_at_once_and_a_device_is_in_one() -> None:
    settings = dataclasses.replace(SMALL, max_cohorts=3)
    fleet = Fleet(36, settings)
    fleet.check_in()
    assert len(fleet.results) >= 3 and all(isinstance(r, Unmasked) for r in fleet.results)
    members = [set(r.members) for r in fleet.results[:3]]
    assert not (members[0] & members[1]) and not (members[1] & members[2]) and len(set.union(*members)) == 36


# --- hostile input ---------------------------------------------------------------------------------
def test_a_malformed_share_makes_its_receiver_leave_and_the_cohort_completes() -> None:
    def corrupt(agent: str, msg: object) -> object:
        if isinstance(msg, SharesMsg) and agent == "dev-00":
            blob = bytearray(msg.shares["dev-01"])
            blob[20] ^= 1
            return dataclasses.replace(msg, shares={**msg.shares, "dev-01": bytes(blob)})
        return msg

    fleet = Fleet(12, SMALL)
    fleet.up_filter = corrupt  # type: ignore[assignment]
    fleet.check_in()
    fleet.run_to_end()
    assert fleet.refusals() == {"dev-01": "bad_share"}
    contributors = check_sum(fleet, only_result(fleet))
    assert "dev-01" not in contributors


def test_a_wrong_revealed_share_is_found_and_counted() -> None:
    def lie(agent: str, msg: object) -> object:
        if isinstance(msg, RevealMsg) and agent == "dev-03":
            wrong = {v: bytes(66) for v in msg.seeds}
            return dataclasses.replace(msg, seeds=wrong)
        return msg

    fleet = Fleet(12, SMALL)
    fleet.up_filter = lie  # type: ignore[assignment]
    fleet.check_in()
    check_sum(fleet, only_result(fleet))
    bad = [r for r in fleet.rejects if r.reason is RejectReason.BAD_SHARE]
    assert bad and {r.agent for r in bad} == {"dev-03"}


def test_messages_for_another_cohort_or_from_outsiders_are_refused() -> None:
    fleet = Fleet(13, dataclasses.replace(SMALL, cohort_size=12, overselect=0.0))
    fleet.die_before["dev-00"] = "sa_masked"  # 11 of 12 upload: the cohort stays open until its timeout
    fleet.tell_offline = False
    fleet.check_in(fleet.agents[:12])
    (open_cohort,) = fleet.manager.cohorts
    outsider = "dev-12"
    got = fleet.manager.receive(outsider, KeysMsg("f" * 32, outsider, bytes(32), bytes(32)), fleet.now)
    assert [r.reason for r in got] == [RejectReason.WRONG_COHORT]  # type: ignore[union-attr]
    got = fleet.manager.receive(outsider, KeysMsg(open_cohort, outsider, bytes(32), bytes(32)), fleet.now)
    assert [r.reason for r in got] == [RejectReason.NOT_MEMBER]  # type: ignore[union-attr]
    late_keys = KeysMsg(open_cohort, "dev-01", bytes(32), bytes(32))
    got = fleet.manager.receive("dev-01", late_keys, fleet.now)
    assert [r.reason for r in got] == [RejectReason.WRONG_PHASE]  # type: ignore[union-attr]
    fleet.run_to_end()
    check_sum(fleet, only_result(fleet))


def test_a_masked_upload_replayed_into_another_cohort_is_refused() -> None:
    first: dict[str, MaskedMsg] = {}

    def keep(agent: str, msg: object) -> object:
        if isinstance(msg, MaskedMsg) and agent not in first:
            first[agent] = msg
        return msg

    fleet = Fleet(12, SMALL)
    fleet.up_filter = keep  # type: ignore[assignment]
    fleet.check_in()
    fleet.up_filter = None
    fleet.die_before["dev-05"] = "sa_reveal"  # keep the second cohort open after the uploads
    fleet.tell_offline = False
    for a in fleet.agents:
        fleet.inputs[a] = fleet.inputs[a] + 0.01
    fleet.check_in()
    second = next(iter(fleet.manager.cohorts))
    old = first["dev-00"]
    got = fleet.manager.receive("dev-00", dataclasses.replace(old, cohort=second), fleet.now)
    assert [r.reason for r in got] == [RejectReason.REPLAYED]  # type: ignore[union-attr]


def test_two_uploads_from_one_device() -> None:
    fleet = Fleet(12, SMALL)
    uploads: list[MaskedMsg] = []
    fleet.die_before["dev-09"] = "sa_reveal"
    fleet.tell_offline = False

    def keep(agent: str, msg: object) -> object:
        if isinstance(msg, MaskedMsg) and agent == "dev-00":
            uploads.append(msg)
        return msg

    fleet.up_filter = keep  # type: ignore[assignment]
    fleet.settings = dataclasses.replace(SMALL, cohort_size=12, overselect=0.0)
    fleet.manager.settings = fleet.settings
    fleet.die_before["dev-11"] = "sa_masked"  # 11 of 12 upload: the round stays open until its timeout
    fleet.check_in()
    (up,) = uploads
    cohort = fleet.manager.cohorts[up.cohort]
    assert cohort.phase == "collecting_inputs"
    again = fleet.manager.receive("dev-00", up, fleet.now)
    assert [r.reason for r in again] == [RejectReason.DUPLICATE]  # type: ignore[union-attr]
    other = dataclasses.replace(up, data=bytes(len(up.data)))
    assert [r.reason for r in fleet.manager.receive("dev-00", other, fleet.now)] == [RejectReason.SECOND_UPLOAD]  # type: ignore[union-attr]
    fleet.run_to_end()
    contributors = check_sum(fleet, only_result(fleet))
    assert "dev-00" in contributors


def test_shares_for_a_device_that_is_not_a_neighbour_are_refused() -> None:
    settings = SecAggSettings(cohort_size=30, overselect=0.2, threshold=0.6, degree=8, timeout=5.0)
    fleet = Fleet(36, settings)

    def claim(agent: str, msg: object) -> object:
        if isinstance(msg, SharesMsg) and agent == "dev-00":
            session = fleet.sessions[agent]
            assert session.graph is not None
            stranger = next(a for a in fleet.agents if a not in session.graph.holders(agent))
            return dataclasses.replace(msg, shares={**msg.shares, stranger: bytes(60)})
        if isinstance(msg, RevealMsg) and agent == "dev-01":
            session = fleet.sessions[agent]
            assert session.graph is not None
            stranger = next(a for a in fleet.agents if a not in session.graph.holders(agent))
            return dataclasses.replace(msg, seeds={**msg.seeds, stranger: bytes(66)})
        return msg

    fleet.up_filter = claim  # type: ignore[assignment]
    fleet.check_in()
    fleet.run_to_end()
    reasons = [r for r in fleet.rejects if r.reason is RejectReason.NOT_NEIGHBOUR]
    assert {r.agent for r in reasons} == {"dev-00", "dev-01"}
    contributors = check_sum(fleet, only_result(fleet))
    assert "dev-00" not in contributors  # its shares were refused: it never got into the relay


def test_a_roster_with_a_non_neighbour_is_refused_by_the_device() -> None:
    settings = SecAggSettings(cohort_size=30, overselect=0.2, threshold=0.6, degree=8, timeout=5.0)
    fleet = Fleet(36, settings)
    keys_seen: dict[str, KeysMsg] = {}

    def record(agent: str, msg: object) -> object:
        if isinstance(msg, KeysMsg):
            keys_seen[agent] = msg
        return msg

    def inject(agent: str, msg: object) -> object:
        if isinstance(msg, RosterMsg) and agent == "dev-00":
            session = fleet.sessions[agent]
            assert session.graph is not None
            stranger = next(a for a in keys_seen if a not in session.graph.holders(agent))
            return dataclasses.replace(msg, keys=(*msg.keys, keys_seen[stranger]))
        return msg

    fleet.up_filter = record  # type: ignore[assignment]
    fleet.down_filter = inject  # type: ignore[assignment]
    fleet.check_in()
    fleet.run_to_end()
    assert fleet.refusals() == {"dev-00": "not_neighbour"}
    check_sum(fleet, only_result(fleet))


def test_an_unmask_request_that_calls_an_uploader_dropped_is_refused() -> None:
    def equivocate(agent: str, msg: object) -> object:
        if isinstance(msg, UnmaskMsg) and agent == "dev-02":
            return dataclasses.replace(
                msg, survivors=tuple(a for a in msg.survivors if a != "dev-02"), dropped=(*msg.dropped, "dev-02")
            )
        return msg

    fleet = Fleet(12, SMALL)
    fleet.down_filter = equivocate  # type: ignore[assignment]
    fleet.check_in()
    fleet.run_to_end()
    assert fleet.refusals() == {"dev-02": "bad_unmask"}
    check_sum(fleet, only_result(fleet))  # 9 reveals >= t = 8


def test_an_equivocating_aggregator_cannot_collect_both_secrets_of_a_device() -> None:
    """The aggregator tells half the holders that dev-00 dropped and the others that it uploaded.

    Each honest holder reveals one of dev-00's two secrets, never both; since t is a strict
    majority of the holders, at most one of the two secrets reaches t shares.
    """
    revealed: dict[str, RevealMsg] = {}

    def equivocate(agent: str, msg: object) -> object:
        if isinstance(msg, UnmaskMsg) and agent != "dev-00" and int(agent[-2:]) % 2:
            return dataclasses.replace(
                msg, survivors=tuple(a for a in msg.survivors if a != "dev-00"), dropped=(*msg.dropped, "dev-00")
            )
        return msg

    def record(agent: str, msg: object) -> object:
        if isinstance(msg, RevealMsg):
            revealed[agent] = msg
        return msg

    fleet = Fleet(12, dataclasses.replace(SMALL, cohort_size=12, overselect=0.0))
    fleet.down_filter = equivocate  # type: ignore[assignment]
    fleet.up_filter = record  # type: ignore[assignment]
    fleet.check_in()
    fleet.run_to_end()
    seed_shares = sum("dev-00" in r.seeds for r in revealed.values())
    key_shares = sum("dev-00" in r.keys for r in revealed.values())
    t = fleet.sessions["dev-00"].announce.threshold
    assert seed_shares + key_shares <= 12 and min(seed_shares, key_shares) < t
    assert seed_shares >= 1 and key_shares >= 1  # the lie reached both halves


def test_t_minus_one_holders_and_the_aggregator_learn_nothing() -> None:
    """The real shares of a device's seed that t - 1 colluding holders hold do not give the seed; t do.

    The aggregator only ever relayed them encrypted, so t - 1 colluders are all it can add up;
    that those are consistent with every seed is the hypothesis property in
    ``test_secagg_primitives.py``. Here: with the shares the protocol actually made.
    """
    from fedmq.secagg import shamir

    fleet = Fleet(12, SMALL)
    fleet.check_in()
    victim = fleet.sessions["dev-00"]
    assert victim.graph is not None
    t, seed = victim.announce.threshold, victim._s.seed
    shares = {victim.graph.index(a): fleet.sessions[a]._s.held["dev-00"][0] for a in fleet.agents[1:]}
    colluders = dict(list(shares.items())[: t - 1])
    guess = shamir.interpolate(colluders)  # the best a degree-(t-2) fit can say about the seed
    assert guess.to_bytes(66, "big")[-32:] != seed
    with pytest.raises(shamir.ShareError):
        shamir.combine(colluders, t)
    assert shamir.combine(dict(list(shares.items())[:t]), t) == seed  # they are real shares


# --- signatures --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def federation_pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[crypto.Verifier, dict[str, crypto.Signer]]:
    root: Path = tmp_path_factory.mktemp("pki")
    names = [f"dev-{i:02d}" for i in range(12)]
    pki.init(root, names, group=None)
    signers = {
        n: crypto.Signer.from_files(str(root / "clients" / n / "client.crt"), str(root / "clients" / n / "client.key"))
        for n in [*names, "aggregator"]
    }
    return crypto.Verifier.from_file(str(root / "ca" / "ca.crt")), signers


def signed_fleet(federation_pki: tuple[crypto.Verifier, dict[str, crypto.Signer]]) -> Fleet:
    verifier, signers = federation_pki
    return Fleet(12, SMALL, signers={k: v for k, v in signers.items() if k != "aggregator"}, verifier=verifier)


def test_signed_keys_verify_and_the_sum_is_right(
    federation_pki: tuple[crypto.Verifier, dict[str, crypto.Signer]],
) -> None:
    fleet = signed_fleet(federation_pki)
    fleet.check_in()
    check_sum(fleet, only_result(fleet))
    assert not fleet.refusals()


def test_a_substituted_key_in_the_roster_is_refused(
    federation_pki: tuple[crypto.Verifier, dict[str, crypto.Signer]],
) -> None:
    """The aggregator swaps dev-01's mask key for its own in dev-00's roster: dev-00 sees the bad signature."""
    mine = crypto.public_bytes(crypto.new_key())

    def substitute(agent: str, msg: object) -> object:
        if isinstance(msg, RosterMsg) and agent == "dev-00":
            return dataclasses.replace(
                msg, keys=tuple(dataclasses.replace(k, mask_pk=mine) if k.agent_id == "dev-01" else k for k in msg.keys)
            )
        return msg

    fleet = signed_fleet(federation_pki)
    fleet.down_filter = substitute  # type: ignore[assignment]
    fleet.check_in()
    fleet.run_to_end()
    assert fleet.refusals() == {"dev-00": "bad_signature"}
    assert "dev-00" not in check_sum(fleet, only_result(fleet))


def test_forged_keys_are_refused_by_the_aggregator_too(
    federation_pki: tuple[crypto.Verifier, dict[str, crypto.Signer]],
) -> None:
    _, signers = federation_pki

    def forge(agent: str, msg: object) -> object:
        if isinstance(msg, KeysMsg) and agent == "dev-03":  # signed by another device's key
            payload = crypto.advert_payload(msg.cohort, agent, msg.mask_pk, msg.share_pk)
            return dataclasses.replace(msg, sig=signers["dev-04"].sign(payload))
        if isinstance(msg, KeysMsg) and agent == "dev-05":  # the aggregator's own certificate
            agg = signers["aggregator"]
            payload = crypto.advert_payload(msg.cohort, agent, msg.mask_pk, msg.share_pk)
            return dataclasses.replace(msg, cert=agg.cert_der, sig=agg.sign(payload))
        return msg

    fleet = signed_fleet(federation_pki)
    fleet.up_filter = forge  # type: ignore[assignment]
    fleet.check_in()
    fleet.run_to_end()
    bad = {r.agent: r.detail for r in fleet.rejects if r.reason is RejectReason.BAD_SIGNATURE}
    assert set(bad) == {"dev-03", "dev-05"} and "do not carry its signature" in bad["dev-03"]
    assert "names ['aggregator']" in bad["dev-05"]
    contributors = check_sum(fleet, only_result(fleet))
    assert not {"dev-03", "dev-05"} & set(contributors)


def test_unsigned_keys_are_refused_where_the_device_has_a_ca(
    federation_pki: tuple[crypto.Verifier, dict[str, crypto.Signer]],
) -> None:
    verifier, _ = federation_pki
    fleet = Fleet(12, SMALL, verifier=None)  # the aggregator does not check; devices do
    fleet.check_in()  # unsigned, unchecked: works (the deployment without a CA)
    check_sum(fleet, only_result(fleet))
    strict = Fleet(12, SMALL)
    for a in strict.agents:
        strict.signers.pop(a, None)
    strict.manager.verifier = None

    def with_ca(agent: str, msg: object) -> object:
        if isinstance(msg, RosterMsg):
            strict.sessions[agent].verifier = verifier
        return msg

    strict.down_filter = with_ca  # type: ignore[assignment]
    strict.check_in()
    strict.run_to_end()
    assert set(strict.refusals().values()) == {"bad_signature"}
    assert isinstance(only_result(strict), Abandoned)


def test_params_defaults_validate() -> None:
    assert Params.from_wire(Params().to_wire()) == Params()
    relay = RelayMsg("a" * 32, {"dev-00": b"x" * 60})
    assert decode_down(relay.to_bytes()) == relay


def test_devices_checking_in_again_still_get_a_smaller_cohort_after_form_wait() -> None:
    """A device in the pool checks in every few seconds; that must not restart its wait.

    Four devices for cohorts of five (K = 4, rho = 0.25), checking in every 0.5 s with
    form_wait 2 s: a cohort of the four forms once the first of them has waited 2 s.
    """
    from fedmq.secagg.messages import CheckIn
    from fedmq.secagg.server import CohortManager, Formed, SecAggSettings

    settings = SecAggSettings(cohort_size=4, overselect=0.25, min_cohort=3, form_wait=2.0, timeout=10.0)
    manager = CohortManager(settings, n_values=11)
    formed: list[Formed] = []
    now = 0.0
    while now < 2.6 and not formed:
        for a in ("d0", "d1", "d2", "d3"):
            outs = manager.check_in(a, CheckIn(a), now, version=0, run=None)
            formed += [o for o in outs if isinstance(o, Formed)]
        formed += [o for o in manager.tick(now, version=0, run=None) if isinstance(o, Formed)]
        now += 0.5
    assert [f.members for f in formed] == [("d0", "d1", "d2", "d3")]
    assert now <= 2.5 + 1e-9
