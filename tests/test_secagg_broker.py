"""Tier 3: secure aggregation over a real Mosquitto on the TLS deployment of ``fedmq broker init``.

The devices are real ``fedmq agent`` processes with their own certificates; they sign their
keys with them and check each other's against the CA. The tests watch what crosses the broker
(the aggregator only ever receives masked uploads), kill a device in the middle of a cohort,
and kill the aggregator process with SIGKILL in the middle of cohorts and restart it on its
state folder: no (device, update) is ever applied twice, and sums go on.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from aggregator.service import AggregatorService
from broker.launcher import MosquittoBroker
from broker.pki import load_registry
from fedmq.config import AggregatorConfig, BrokerConfig, Config, SecAggConfig
from fedmq.messages import metrics_from_bytes
from tests.helpers import payload, start_aggregator, tls_deployment, wait_until

pytestmark = pytest.mark.broker
PREFIX = "fedmq/sa"
ROOT = Path(__file__).resolve().parents[1]
AGENTS = [f"dev-{i}" for i in range(6)]


@dataclass
class Deployment:
    root: Path
    broker: MosquittoBroker

    def tls(self, identity: str) -> BrokerConfig:
        client = self.root / "clients" / identity
        return BrokerConfig(
            host="127.0.0.1",
            port=self.broker.port,
            tls=True,
            ca_file=str(client / "ca.crt"),
            cert_file=str(client / "client.crt"),
            key_file=str(client / "client.key"),
        )

    def tls_flags(self, identity: str) -> list[str]:
        client = self.root / "clients" / identity
        return [
            "--broker", f"mqtts://127.0.0.1:{self.broker.port}", "--prefix", PREFIX,
            "--ca-file", str(client / "ca.crt"), "--cert-file", str(client / "client.crt"),
            "--key-file", str(client / "client.key"),
        ]  # fmt: skip

    def agent(self, identity: str) -> subprocess.Popen[bytes]:
        """A ``fedmq agent`` process of ``identity`` (no local DP: the test is about the masks)."""
        return subprocess.Popen(
            [
                sys.executable, "-m", "cli", "agent", *self.tls_flags(identity), "--id", identity,
                "--data", "builtin:digits-train", "--round-interval", "0", "--no-dp", "--checkin-interval", "0.5",
                "--require-secure-aggregation", "--log-level", "WARNING",
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
        )  # fmt: skip

    def ops(self) -> Any:
        import aiomqtt

        reg = load_registry(self.root)
        assert reg is not None
        password = (self.root / "broker" / "ops.password").read_text().strip()
        return aiomqtt.Client("127.0.0.1", reg.ops_port, username="ops", password=password)


@pytest.fixture(scope="module")
def deployment() -> Iterator[Deployment]:
    with tls_deployment(AGENTS, PREFIX) as (root, broker):
        yield Deployment(root, broker)


def secure_config(deployment: Deployment, **agg: Any) -> Config:
    base = AggregatorConfig(
        rule="fedbuff",
        buffer_size=4,
        server_lr=1.0,
        metrics_interval=0.2,
        secure_aggregation=True,
        secagg=SecAggConfig(overselect=0.25, timeout=10.0),  # rounds end when all answered: no wait
        eval_data="builtin:digits-test",
    )
    return Config(prefix=PREFIX, broker=deployment.tls("aggregator"), aggregator=replace(base, **agg)).validate()


def stop_agents(procs: list[subprocess.Popen[bytes]]) -> list[dict[str, Any]]:
    stats = []
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        out, _ = p.communicate(timeout=60)
        if p.returncode == 0:
            stats.append(json.loads(out.decode().strip().splitlines()[-1]))
    return stats


async def test_fedmq_agents_sum_over_tls_and_the_aggregator_sees_only_masked_uploads(deployment: Deployment) -> None:
    cfg = secure_config(deployment)
    server = AggregatorService(cfg)
    topics: list[str] = []
    handle = server.handle

    async def spy(topic: str, body: bytes) -> None:
        topics.append(topic)
        await handle(topic, body)

    server.handle = spy  # type: ignore[method-assign]
    stop = asyncio.Event()
    task = asyncio.create_task(server.run(stop))
    await asyncio.wait_for(server.ready.wait(), 30)
    procs = [deployment.agent(a) for a in AGENTS[:5]]
    try:
        core = server.core
        assert core is not None
        await wait_until(server.pulse, lambda: core.stats.cohorts_applied >= 4, limit=120)
    finally:
        stats = stop_agents(procs)
        stop.set()
        summary = await task
    assert len(stats) == 5  # every agent exited 0 at SIGTERM
    assert not any(s["secure"]["refused"] for s in stats)  # every roster signature verified
    summed = sum(s["secure"]["summed"] for s in stats)
    assert 0 < summed <= sum(s["receipts_accepted"] for s in stats) <= core.stats.accepted
    assert not [t for t in topics if "/update/" in t]  # no plain update ever reached the aggregator
    assert {t.split("/")[2] for t in topics} >= {"secagg", "status"}
    assert set(core.stats.rejected) == set()
    assert summary["cohorts_applied"] >= 4 and summary["final_accuracy"] > 0.5


async def test_a_device_killed_mid_cohort_is_a_dropout_and_cohorts_go_on(deployment: Deployment) -> None:
    server, stop, task = await start_aggregator(secure_config(deployment, buffer_size=3))
    core = server.core
    assert core is not None and core.secagg is not None
    procs = [deployment.agent(a) for a in AGENTS]
    try:
        await wait_until(server.pulse, lambda: bool(core.secagg.cohorts) and core.stats.cohorts_applied >= 1, limit=120)  # type: ignore[union-attr]
        cohort = next(iter(core.secagg.cohorts.values()))  # type: ignore[union-attr]
        victim = cohort.members[0]
        procs[AGENTS.index(victim)].kill()  # SIGKILL: its Will says offline
        applied = core.stats.cohorts_applied
        await wait_until(server.pulse, lambda: core.stats.cohorts_applied >= applied + 3, limit=120)
    finally:
        stop_agents(procs)
        stop.set()
        await task
    assert set(core.stats.rejected) <= {"not_member", "wrong_cohort"}


async def test_kill_9_of_the_aggregator_mid_cohort_abandons_cleanly_and_applies_nothing_twice(
    deployment: Deployment, tmp_path: Path
) -> None:
    """SIGKILL the aggregator process four times while cohorts are in flight, restart it on its folder.

    Each kill lands in the round the metrics show open (the seam tests in test_secagg_service.py
    crash in each round deterministically); at least two different rounds are hit. Afterwards the
    state on disk is replayed: as many receipts as accepted updates, each (device, seq) once.
    """
    state = tmp_path / "state"
    cmd = [
        sys.executable, "-m", "cli", "aggregator", *deployment.tls_flags("aggregator"),
        "--secure-aggregation", "--buffer-size", "4", "--overselect", "0.25", "--secagg-timeout", "3",
        "--checkpoint-dir", str(state), "--checkpoint-every", "2", "--server-lr", "1.0",
        "--metrics-interval", "0.05", "--eval-data", "builtin:digits-test", "--log-level", "WARNING",
    ]  # fmt: skip
    procs = [deployment.agent(a) for a in AGENTS[:5]]
    phases: list[str] = []
    wanted = ["collecting_inputs", "collecting_reveals", "collecting_shares", "collecting_keys"]
    try:
        async with deployment.ops() as ops:
            await ops.subscribe(f"{PREFIX}/metrics", qos=0)
            for kill, phase in enumerate(wanted):
                agg = subprocess.Popen([*cmd, *(["--fresh"] if kill == 0 else [])], cwd=ROOT, stdout=subprocess.DEVNULL)
                try:
                    loop = asyncio.get_running_loop()
                    patience = loop.time() + 30  # then any open round will do
                    async with asyncio.timeout(120):
                        async for msg in ops.messages:
                            m = metrics_from_bytes(payload(msg))
                            open_rounds = set(m.get("cohorts_open", {}).values())
                            if m.get("cohorts_applied", 0) < kill + 1 or not open_rounds:
                                continue
                            if phase in open_rounds or loop.time() > patience:
                                phases.append(phase if phase in open_rounds else sorted(open_rounds)[0])
                                break
                finally:
                    agg.kill()  # SIGKILL: no checkpoint, no goodbye
                    agg.wait(30)
            agg = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE)
            try:
                async with asyncio.timeout(120):  # after the last restart: sums again
                    async for msg in ops.messages:
                        m = metrics_from_bytes(payload(msg))
                        if m.get("cohorts_applied", 0) >= len(wanted) + 2 and m.get("cohorts_abandoned", 0) >= 1:
                            break
            finally:
                agg.send_signal(signal.SIGTERM)
                out, _ = agg.communicate(timeout=60)
        assert agg.returncode == 0
    finally:
        stats = stop_agents(procs)
    assert len(phases) == len(wanted) and len(set(phases)) >= 2, phases
    assert len(stats) == 5 and not any(s["secure"]["refused"] for s in stats)
    cfg = secure_config(deployment)
    service = AggregatorService(replace(cfg, aggregator=replace(cfg.aggregator, checkpoint_dir=str(state))))
    core = service.startup()
    receipts = sum(len(rec.receipts) for a in AGENTS if (rec := core.agent(a)) is not None)
    assert receipts == core.stats.accepted > 0
    # One abandoned cohort per kill at least, for each kill past a cohort's first round. In
    # collecting_keys the metrics (the core in memory) may show a cohort whose opening was not
    # yet durable: its devices had heard nothing of it (its messages wait for the fsync), so the
    # restart has nothing to abandon, and that is clean too.
    assert core.stats.cohorts_abandoned >= sum(p != "collecting_keys" for p in phases), phases
    summary = json.loads(out.decode().strip().splitlines()[-1])
    assert summary["cohorts_applied"] == core.stats.cohorts_applied and core.version == summary["model_versions"]


async def test_an_agent_that_requires_secure_aggregation_sends_nothing_to_a_plain_aggregator(
    deployment: Deployment,
) -> None:
    import numpy as np

    from edge_agent.service import AgentService
    from edge_agent.trainer import LocalTrainer
    from fedmq.config import AgentConfig, PrivacyConfig
    from models.datasets import digits

    plain = replace(
        secure_config(deployment), aggregator=replace(secure_config(deployment).aggregator, secure_aggregation=False)
    )
    server, stop, task = await start_aggregator(plain)
    acfg = AgentConfig(agent_id="dev-5", round_interval=0.0, require_secure_aggregation=True)
    train, _ = digits()
    cfg = replace(plain, broker=deployment.tls("dev-5"), agent=acfg)
    trainer = LocalTrainer(acfg, PrivacyConfig(enabled=False), train, rng=np.random.default_rng(0))
    agent = AgentService(cfg, trainer)
    agent_stop = asyncio.Event()
    run = asyncio.create_task(agent.run(agent_stop))
    try:
        await wait_until(agent.pulse, lambda: agent.stats.models_received >= 1 and agent._warned_plain, limit=60)
        assert agent.stats.updates_published == 0 and len(agent.outbox) == 0  # nothing trained, nothing sent
    finally:
        agent_stop.set()
        await run
        stop.set()
        await task
    assert server.core is not None and server.core.stats.accepted == 0


async def test_distributed_dp_over_tls_agents_spend_their_budget_and_stop(deployment: Deployment) -> None:
    """Distributed DP end to end: real ``fedmq agent`` processes add discrete Gaussian noise before
    masking, each charges every sum it uploads to against its budget and exits when the next one
    would pass it; the aggregator's ledger agrees and its federation epsilon stays under the target."""
    import math

    from fedmq.secagg import ddp
    from fedmq.secagg.graph import threshold_for

    cap = 3
    cfg = secure_config(
        deployment,
        secagg=SecAggConfig(overselect=0.25, timeout=10.0, dp_epsilon=8.0),
        max_participation=cap,
    )
    server, stop, task = await start_aggregator(cfg)
    params = server._secagg_params
    assert params is not None and params.distributed_dp and params.dp_survivors == 4
    # The budget lies between two and three sums of a full cohort (5 members, t = 3 < 4 survivors).
    release = ddp.cohort_params(
        stddev=params.dp_stddev, survivors=max(4, threshold_for(5, 0.6)), clip_norm=params.clip_norm,
        beta=params.dp_beta, bits=params.bits, members=5, dim=server._params + 1,
    )  # fmt: skip
    two, three = (ddp.epsilon(k * ddp.rdp(release), 1e-5) for k in (2, 3))
    assert two < three <= 8.0 + 1e-6
    budget = (two + three) / 2
    procs = [ddp_agent(deployment, a, budget) for a in AGENTS[:5]]
    core = server.core
    assert core is not None and core.ledger is not None
    try:
        exited = await asyncio.to_thread(lambda: [p.wait(timeout=180) for p in procs])  # they stop by themselves
    finally:
        stats = stop_agents(procs)
        stop.set()
        await task
    assert exited == [0] * 5 and len(stats) == 5
    for s in stats:
        assert s["state"] == "budget_exhausted", s
        assert two * 0.95 <= s["epsilon"] <= budget  # two sums' worth (a smaller cohort costs a bit more)
        assert s["secure"]["masked_uploads"] >= 2
    counts = [core.ledger.count(a) for a in AGENTS[:5]]
    assert all(c <= 2 for c in counts) and sum(counts) == core.stats.accepted >= 8
    assert core.stats.cohorts_applied >= 2
    assert 0 < core.stats.max_epsilon <= budget and math.isfinite(core.stats.max_epsilon)


def ddp_agent(deployment: Deployment, identity: str, budget: float) -> subprocess.Popen[bytes]:
    """A ``fedmq agent`` that sends only into distributed-DP cohorts, with an epsilon budget."""
    cmd = [
        sys.executable, "-m", "cli", "agent", *deployment.tls_flags(identity), "--id", identity,
        "--data", "builtin:digits-train", "--round-interval", "0", "--no-dp", "--checkin-interval", "0.5",
        "--require-distributed-dp", "--epsilon-budget", f"{budget:.6f}", "--log-level", "WARNING",
    ]  # fmt: skip
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE)


async def test_an_agent_that_requires_distributed_dp_sends_nothing_to_sums_without_noise(
    deployment: Deployment,
) -> None:
    """Secure aggregation without distributed noise is not enough for a device that requires it."""
    import numpy as np

    from edge_agent.service import AgentService
    from edge_agent.trainer import LocalTrainer
    from fedmq.config import AgentConfig, PrivacyConfig
    from models.datasets import digits

    cfg = secure_config(deployment)  # secure aggregation, no --dp-epsilon
    server, stop, task = await start_aggregator(cfg)
    acfg = AgentConfig(agent_id="dev-5", round_interval=0.0, checkin_interval=0.5)
    privacy = PrivacyConfig(enabled=False, require_distributed=True, epsilon_budget=8.0)
    train, _ = digits()
    agent = AgentService(replace(cfg, broker=deployment.tls("dev-5"), agent=acfg, privacy=privacy), LocalTrainer(
        acfg, privacy, train, rng=np.random.default_rng(0)
    ))  # fmt: skip
    agent_stop = asyncio.Event()
    run = asyncio.create_task(agent.run(agent_stop))
    try:
        await wait_until(agent.pulse, lambda: agent.stats.models_received >= 1 and agent._warned_plain, limit=60)
        assert agent.stats.updates_published == 0 and len(agent.outbox) == 0
        assert agent.stats.secure.cohorts_joined == 0  # it does not even check in
    finally:
        agent_stop.set()
        await run
        stop.set()
        await task
    assert server.core is not None and server.core.stats.accepted == 0 and not server.core.secagg.pool  # type: ignore[union-attr]
