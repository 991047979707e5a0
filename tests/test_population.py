"""The population simulator (simulator/population.py) and the agent's distributed-DP ledger.

Small fleets on scikit-learn's digits, so that these run in seconds: every mechanism learns
through the product's own code, every device's epsilon stays within the target, the schedule
is the same for every mechanism, and the agent refuses a release past its budget.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from edge_agent.pipeline import BudgetExhausted
from edge_agent.trainer import LocalTrainer
from fedmq.config import AgentConfig, AggregatorConfig, Config, PrivacyConfig, SecAggConfig
from fedmq.errors import ConfigError
from fedmq.secagg import ddp
from models.datasets import Dataset
from models.tasks import get_task
from simulator.population import MECHANISMS, PopulationConfig, for_fleet, run_population


@pytest.fixture(scope="module")
def fleet() -> tuple[list[Dataset], Dataset]:
    return get_task("digits").load(60, seed=0)


def small(mechanism: str, **kw: object) -> PopulationConfig:
    base = PopulationConfig(
        mechanism=mechanism, buffer=20, survivors=16, concurrency=40, releases=8, hidden=16,
        local_epochs=2, lr=0.3, server_lr=1.0, clip=2.0, eval_every=4,
    )  # fmt: skip
    return replace(base, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_each_mechanism_runs_the_same_schedule_and_keeps_its_epsilon(
    fleet: tuple[list[Dataset], Dataset], mechanism: str
) -> None:
    data, test = fleet
    r = run_population(small(mechanism, epsilon=1000.0), data, test)
    assert r.contributions <= 60 * 8 and r.steps == (r.contributions - r.contributions % 20) // 20
    if mechanism == "none":
        assert r.max_epsilon == 0.0 and not r.noise
    else:
        assert 0 < r.max_epsilon <= 1000.0 * (1 + 1e-3)
    # At an epsilon this loose the noise is small: every mechanism learns well above chance (0.1).
    assert r.accuracy > 0.5, (mechanism, r.curve)


def test_a_tight_epsilon_costs_accuracy_and_is_met(fleet: tuple[list[Dataset], Dataset]) -> None:
    data, test = fleet
    loose = run_population(small("distributed", epsilon=1000.0), data, test)
    tight = run_population(small("distributed", epsilon=1.0), data, test)
    assert tight.max_epsilon <= 1.0 + 1e-3
    assert tight.noise["central_stddev"] > 10 * loose.noise["central_stddev"]
    assert tight.accuracy < loose.accuracy


def test_the_seed_fixes_what_it_should_and_not_the_central_or_distributed_noise(
    fleet: tuple[list[Dataset], Dataset],
) -> None:
    data, test = fleet
    a = run_population(small("local", releases=3), data, test)  # the agent's injected generator
    b = run_population(small("local", releases=3), data, test)
    assert a.curve == b.curve and a.max_epsilon == b.max_epsilon
    c = run_population(small("distributed", releases=3), data, test)  # fresh OS keys, as on devices
    d = run_population(small("distributed", releases=3), data, test)
    assert c.steps == d.steps and c.contributions == d.contributions  # the same schedule
    assert c.curve != d.curve  # but not the same noise


def test_distributed_noise_matches_its_calibration(fleet: tuple[list[Dataset], Dataset]) -> None:
    """The noise each sum carries is what ddp.calibrate chose for t survivors (K uploads carry a bit more)."""
    data, test = fleet
    r = run_population(small("distributed", epsilon=8.0), data, test)
    dim = 64 * 16 + 16 + 16 * 10 + 10 + 1
    calib = ddp.calibrate(8.0, 1e-5, releases=8, survivors=16, summands=24, dim=dim, clip=ddp.input_clip(2.0))
    assert r.noise["central_stddev"] == pytest.approx(calib.params.central_stddev)


def test_bad_settings_are_named(fleet: tuple[list[Dataset], Dataset]) -> None:
    data, test = fleet
    with pytest.raises(ValueError, match=r"population\.survivors"):
        run_population(small("none", survivors=30), data, test)
    with pytest.raises(ValueError, match=r"population\.mechanism"):
        run_population(small("laplace"), data, test)
    with pytest.raises(ValueError, match=r"population\.buffer"):
        run_population(small("none", buffer=100, survivors=80, concurrency=100), data, test)


@pytest.mark.parametrize("devices", [100, 1000, 10_000])
def test_the_fleet_presets_are_valid(devices: int) -> None:
    cfg = for_fleet(devices).validate()
    assert cfg.buffer <= devices and cfg.survivors <= cfg.buffer <= cfg.concurrency <= devices
    assert cfg.survivors == math.ceil(0.9 * cfg.buffer)


# --- the agent's ledger ------------------------------------------------------------------------------
RELEASE = ddp.cohort_params(stddev=6.0, survivors=8, clip_norm=1.0, beta=math.exp(-0.5), bits=32, members=12, dim=651)


def test_the_agent_charges_each_upload_and_stops_before_its_budget(tmp_path: Path) -> None:
    one = ddp.epsilon(ddp.rdp(RELEASE), 1e-5)
    two = ddp.epsilon(2 * ddp.rdp(RELEASE), 1e-5)
    privacy = PrivacyConfig(enabled=False, require_distributed=True, epsilon_budget=(one + two) / 2)
    privacy.validate()
    data = get_task("digits").load(1)[0][0]
    state = tmp_path / "a.state"
    t = LocalTrainer(AgentConfig(agent_id="a"), privacy, data, rng=np.random.default_rng(0), state_path=state)
    assert t.epsilon is None
    assert t.charge_distributed(RELEASE) == pytest.approx(one)
    with pytest.raises(BudgetExhausted) as exc:
        t.charge_distributed(RELEASE)
    assert exc.value.epsilon_next == pytest.approx(two) and t.exhausted is exc.value
    assert t.epsilon == pytest.approx(one)  # the refused release was not charged
    again = LocalTrainer(AgentConfig(agent_id="a"), privacy, data, rng=np.random.default_rng(0), state_path=state)
    assert again.ddp.releases == {RELEASE: 1} and again.epsilon == pytest.approx(one)


def test_local_and_distributed_releases_add_up() -> None:
    data = get_task("digits").load(1)[0][0]
    privacy = PrivacyConfig(noise_multiplier=2.0)
    t = LocalTrainer(AgentConfig(agent_id="a"), privacy, data, rng=np.random.default_rng(0))
    assert t.accountant is not None
    t.accountant.record(2.0, 3)
    local = t.accountant.epsilon()
    assert t.charge_distributed(RELEASE) == pytest.approx(local + ddp.epsilon(ddp.rdp(RELEASE), 1e-5))


@pytest.mark.parametrize(
    ("agg", "key"),
    [
        ({"secagg": SecAggConfig(dp_epsilon=8.0), "max_participation": 5}, "aggregator.secagg.dp_epsilon"),
        (
            {"secure_aggregation": True, "secagg": SecAggConfig(dp_epsilon=8.0), "max_participation": 0},
            "aggregator.max_participation",
        ),
        (
            {"secure_aggregation": True, "secagg": SecAggConfig(dp_epsilon=8.0, dp_survivors=20)},
            "aggregator.secagg.dp_survivors",
        ),
        ({"central_dp_noise_multiplier": 1.0, "rule": "fedasync"}, "aggregator.central_dp_noise_multiplier"),
        ({"central_dp_noise_multiplier": 1.0, "secure_aggregation": True}, "aggregator.central_dp_noise_multiplier"),
        ({"central_dp_noise_multiplier": -1.0}, "aggregator.central_dp_noise_multiplier"),
        ({"dp_delta": 1.0}, "aggregator.dp_delta"),
        ({"min_separation": 3}, "aggregator.min_separation"),
    ],
)
def test_dp_settings_that_cannot_hold_are_refused_at_startup(agg: dict[str, object], key: str) -> None:
    cfg = Config(aggregator=replace(AggregatorConfig(max_participation=5), **agg))  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as exc:
        cfg.validate()
    assert exc.value.key == key


def test_a_budget_needs_local_or_distributed_dp() -> None:
    with pytest.raises(ConfigError, match="require-distributed-dp"):
        PrivacyConfig(enabled=False, epsilon_budget=8.0).validate()
    PrivacyConfig(enabled=False, require_distributed=True, epsilon_budget=8.0).validate()


def test_fedmq_population_prints_the_result_and_names_an_impossible_fleet(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from cli.main import main

    out = tmp_path / "r.json"
    argv = ["population", "--task", "digits", "--devices", "60", "--mechanism", "central", "--releases", "3",
            "--local-epochs", "1", "--hidden", "8", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "mechanism central" in printed and "max epsilon (per device)   8.000" in printed
    import json

    result = json.loads(out.read_text())
    assert result["devices"] == 60 and result["config"]["releases"] == 3 and result["max_epsilon"] <= 8.0
    assert main(["population", "--task", "digits", "--devices", "5000"]) == 2
    assert "too few for 5000 devices" in capsys.readouterr().err
