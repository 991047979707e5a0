"""The federation plan: announced by the aggregator with the model, followed by devices (issue 15)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import msgpack
import numpy as np
import pytest

from aggregator.service import AggregatorService, federation_plan
from broker.launcher import MosquittoBroker
from edge_agent.plan import follow
from edge_agent.service import AgentService
from edge_agent.trainer import LocalTrainer
from fedmq.config import AgentConfig, AggregatorConfig, BrokerConfig, Config, PlanConfig, PrivacyConfig, load_config
from fedmq.errors import ConfigError, DecodeError, RejectReason
from fedmq.messages import ModelMessage, ModelSpec, Plan
from models.datasets import digits
from tests.helpers import wait_until

SPEC = ModelSpec("softmax", 4, 2)


def _model(plan: Plan | None) -> ModelMessage:
    return ModelMessage(version=1, model=SPEC, tensors={"W": np.zeros((4, 2), np.float32)}, plan=plan)


def test_a_plan_travels_with_the_model() -> None:
    plan = Plan(local_epochs=3, lr=0.05, batch_size=32, clip_norm=2.0, noise_multiplier=0.0, compression="fp16")
    back = ModelMessage.from_bytes(_model(plan).to_bytes())
    assert back.plan == plan
    assert ModelMessage.from_bytes(_model(None).to_bytes()).plan is None


@pytest.mark.parametrize(
    "bad",
    [
        {"lr": -1.0},
        {"lr": float("nan")},
        {"local_epochs": 0},
        {"local_epochs": 2.5},
        {"batch_size": True},
        {"compression": "gzip"},
        {"topk_fraction": 2.0},
        {"clip_norm": 0},
        {"shell": "rm -rf /"},
        [1, 2],
    ],
)
def test_a_hostile_plan_is_refused_by_the_decoder(bad: object) -> None:
    obj = msgpack.unpackb(_model(Plan(lr=0.1)).to_bytes())
    obj["plan"] = bad
    with pytest.raises(DecodeError) as caught:
        ModelMessage.from_bytes(msgpack.packb(obj))
    assert caught.value.reason is RejectReason.BAD_FIELD


def test_the_plan_wins_except_where_the_device_may_keep_its_own() -> None:
    own = AgentConfig(local_epochs=1, lr=0.1, batch_size=8, keep_local="batch_size")
    privacy = PrivacyConfig(enabled=False, clip_norm=1.0, noise_multiplier=1.0)
    plan = Plan(local_epochs=5, lr=0.02, batch_size=64, clip_norm=2.0, noise_multiplier=0.7)
    agent, priv, changes = follow(own, privacy, plan)
    assert (agent.local_epochs, agent.lr, agent.batch_size) == (5, 0.02, 8)  # batch size kept: memory
    assert (priv.enabled, priv.clip_norm, priv.noise_multiplier) == (True, 2.0, 0.7)  # the check's noise
    assert "local DP off -> on" in changes and "lr 0.1 -> 0.02" in changes
    assert follow(replace(own, follow_plan=False), privacy, plan) == (replace(own, follow_plan=False), privacy, [])
    assert follow(own, privacy, None) == (own, privacy, [])


def test_only_compute_settings_may_be_kept_against_the_plan() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(overrides={"agent.keep_local": "noise_multiplier"}, env={}, role="agent")
    assert caught.value.key == "agent.keep_local"


def test_the_announced_noise_is_the_one_the_aggregator_checks() -> None:
    checked = AggregatorConfig(dp_noise_multiplier=0.5, dp_clip_norm=2.0)
    assert federation_plan(checked) == Plan(clip_norm=2.0, noise_multiplier=0.5)
    assert federation_plan(AggregatorConfig()) is None
    with pytest.raises(ConfigError) as caught:
        replace(checked, plan=PlanConfig(noise_multiplier=1.0)).validate()
    assert caught.value.key == "aggregator.plan.noise_multiplier"
    cfg = load_config(
        overrides={"aggregator.plan.lr": "0.3", "aggregator.plan.local_epochs": "2"}, env={}, role="aggregator"
    )
    assert federation_plan(cfg.aggregator) == Plan(local_epochs=2, lr=0.3)


@pytest.mark.broker
async def test_devices_configured_otherwise_follow_the_plan_and_pass_the_noise_check(
    mosquitto: MosquittoBroker, prefix: str
) -> None:
    """The aggregator checks z = 0.5, C = 2 and plans 3 local epochs; the devices say z = 1, C = 1, 1 epoch.

    Without the plan every update would be refused as not_private; with it, all are taken.
    """
    train, test = digits()
    agg = AggregatorConfig(
        buffer_size=2,
        dp_noise_multiplier=0.5,
        dp_clip_norm=2.0,
        plan=PlanConfig(local_epochs=3, lr=0.2),
        rate_limit=0,
    )
    cfg = Config(prefix=prefix, broker=BrokerConfig(host=mosquitto.host, port=mosquitto.port), aggregator=agg)
    server = AggregatorService(cfg.validate(), eval_data=test)
    stop = asyncio.Event()
    task = asyncio.create_task(server.run(stop))
    await asyncio.wait_for(server.ready.wait(), 30)
    trainers = []
    runs = []
    for i in range(2):
        acfg = AgentConfig(agent_id=f"dev-{i}", round_interval=0.1, max_updates=3, local_epochs=1, lr=0.1)
        own_privacy = PrivacyConfig(clip_norm=1.0, noise_multiplier=1.0)
        t = LocalTrainer(acfg, own_privacy, train.subset(np.arange(i, 400, 2)), rng=np.random.default_rng(i))
        trainers.append(t)
        runs.append(asyncio.create_task(AgentService(replace(cfg, agent=acfg, privacy=own_privacy), t).run()))
    try:
        await asyncio.wait_for(asyncio.gather(*runs), 90)
        core = server.core
        assert core is not None
        await wait_until(server.pulse, lambda: core.stats.accepted + sum(core.stats.rejected.values()) == 6, 30)
        assert core.stats.rejected == {} and core.stats.accepted == 6
        for t in trainers:
            assert (t.agent.local_epochs, t.agent.lr) == (3, 0.2)
            assert (t.privacy.clip_norm, t.privacy.noise_multiplier) == (2.0, 0.5)
            assert t.accountant is not None and t.accountant.history == [(0.5, 3)]
            assert (t.own_agent.local_epochs, t.own_privacy.noise_multiplier) == (1, 1.0)  # its config untouched
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


@pytest.mark.parametrize(("key", "value"), [("lr", -1.0), ("local_epochs", 0), ("topk_fraction", 2.0),
                                            ("compression", "gzip"), ("noise_multiplier", float("inf"))])  # fmt: skip
def test_the_config_refuses_a_plan_the_devices_would_refuse(key: str, value: object) -> None:
    with pytest.raises(ConfigError) as caught:
        PlanConfig(**{key: value}).validate()  # type: ignore[arg-type]
    assert caught.value.key == f"aggregator.plan.{key}"
    obj = msgpack.unpackb(_model(None).to_bytes())
    obj["plan"] = {key: value}
    with pytest.raises(DecodeError):  # the same rule in the decoder
        ModelMessage.from_bytes(msgpack.packb(obj))
