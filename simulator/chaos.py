"""Chaos run: kill -9 the aggregator over and over while real agents publish, then audit.

The aggregator is a real ``fedmq aggregator`` process (checkpoints + write-ahead log), the
agents are real :class:`~edge_agent.service.AgentService` clients with outboxes, the broker
is a real Mosquitto, optionally killed too. Each receipt an agent gets is recorded with the
update it settles (the agents' own view: a broker crash cannot hide one from the audit). After
the kills, the agents deliver what is left in their outboxes and stop, the aggregator is
stopped with SIGTERM, and the audit checks:

- every accepted receipt names a distinct position (``index``) in the order of application,
  and the same one each time it is re-sent;
- the positions are exactly 1..N, N the number of updates the final state says it applied:
  nothing receipted was lost, nothing applied twice, nothing applied without a receipt;
- replaying the receipted updates in that order through a fresh core (same configuration)
  gives the final model bit for bit.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np

from aggregator.core import Accepted
from aggregator.service import AggregatorService
from aggregator.store import latest_checkpoint
from broker.launcher import MosquittoBroker
from edge_agent.service import AgentService
from edge_agent.trainer import LocalTrainer
from fedmq.config import AgentConfig, AggregatorConfig, BrokerConfig, Config, PrivacyConfig
from fedmq.messages import ReceiptMessage, StatusMessage, UpdateMessage
from simulator.harness import SimConfig, split_digits

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class ChaosConfig:
    """One chaos run against a broker at ``host:port``."""

    host: str
    port: int
    workdir: Path
    prefix: str = "fedmq/chaos"
    agents: int = 20
    kills: int = 10
    seed: int = 0
    uptime: tuple[float, float] = (0.5, 1.5)
    """Seconds the aggregator runs between kills (uniform)."""
    buffer_size: int = 4
    checkpoint_every: int = 5
    receipt_timeout: float = 2.0
    drain_timeout: float = 60.0
    broker: MosquittoBroker | None = None
    """The broker at ``host:port``, needed to kill it too (``broker_kills``)."""
    broker_kills: int = 0
    """kill -9 of the broker (restarted on the same port, without persistence), mixed with the others."""


@dataclass
class ChaosReport:
    """What happened and what the audit found."""

    kills: int = 0
    broker_kills: int = 0
    updates_sent: int = 0
    receipted: int = 0
    applied: int = 0
    duplicates_dropped: int = 0
    rejected_other: int = 0
    resent: int = 0
    lost: int = 0
    applied_twice: int = 0
    applied_without_receipt: int = 0
    inconsistent_receipts: int = 0
    undelivered: int = 0
    model_equals_replay: bool = False
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    retried: int = 0
    """``retry`` answers (rate limit, buffer share): kept by the agents and sent again."""
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every check passed."""
        return (
            self.model_equals_replay
            and self.lost == 0
            and self.applied_twice == 0
            and self.applied_without_receipt == 0
            and self.inconsistent_receipts == 0
        )


def aggregator_config(cfg: ChaosConfig) -> Config:
    """The aggregator's configuration (the subprocess gets the same as flags)."""
    return Config(
        prefix=cfg.prefix,
        broker=BrokerConfig(host=cfg.host, port=cfg.port),
        aggregator=AggregatorConfig(
            rule="fedbuff",
            buffer_size=cfg.buffer_size,
            checkpoint_dir=str(cfg.workdir / "aggregator"),
            checkpoint_every=cfg.checkpoint_every,
            metrics_interval=0.2,
        ),
    ).validate()


def _aggregator_cmd(cfg: ChaosConfig) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fedmq.cli",
        "aggregator",
        "--broker",
        f"mqtt://{cfg.host}:{cfg.port}",
        "--prefix",
        cfg.prefix,
        "--buffer-size",
        str(cfg.buffer_size),
        "--checkpoint-dir",
        str(cfg.workdir / "aggregator"),
        "--checkpoint-every",
        str(cfg.checkpoint_every),
        "--log-level",
        "ERROR",
    ]


class _Observer:
    """The audit's ledger and the aggregator's liveness.

    Records the receipts each agent got, with the bytes of the update they settle, and watches
    the aggregator's status topic (reconnecting across broker restarts).
    """

    def __init__(self, cfg: ChaosConfig) -> None:
        self.cfg = cfg
        self.updates: dict[tuple[str, int], bytes] = {}
        self.receipts: dict[tuple[str, int], set[int]] = {}
        self.online = asyncio.Event()
        self.subscribed = asyncio.Event()

    def on_receipt(self, receipt: ReceiptMessage, payload: bytes) -> None:
        key = (receipt.agent_id, receipt.seq)
        if receipt.status == "accepted" and receipt.index is not None:  # rejections: counted by the aggregator
            self.receipts.setdefault(key, set()).add(receipt.index)
            self.updates.setdefault(key, payload)

    async def run(self) -> None:
        topic = f"{self.cfg.prefix}/server/status"
        while True:
            with contextlib.suppress(aiomqtt.MqttError):
                async with aiomqtt.Client(self.cfg.host, self.cfg.port) as client:
                    await client.subscribe(topic, qos=1)
                    self.subscribed.set()
                    async for msg in client.messages:
                        data = msg.payload if isinstance(msg.payload, (bytes, bytearray)) else b""
                        if _says_online(bytes(data)):
                            self.online.set()
            await asyncio.sleep(0.1)  # the broker is restarting: try again


def _says_online(data: bytes) -> bool:
    return bool(data) and StatusMessage.from_bytes(data).state == "online"


def _agents(cfg: ChaosConfig, base: Config, observer: _Observer) -> list[AgentService]:
    sim = SimConfig(agents=cfg.agents, seed=cfg.seed)
    shards, _ = split_digits(sim)
    out = []
    for i, shard in enumerate(shards):
        acfg = AgentConfig(
            agent_id=f"agent-{i}",
            local_epochs=1,
            lr=0.3,
            round_interval=0.05,
            receipt_timeout=cfg.receipt_timeout,
            outbox_max=8,
        )
        privacy = PrivacyConfig(enabled=False)
        trainer = LocalTrainer(acfg, privacy, shard, rng=np.random.default_rng([cfg.seed, i]))
        service = AgentService(
            replace(base, agent=acfg),
            trainer,
            rng=random.Random(cfg.seed * 1000 + i),
            on_receipt=observer.on_receipt,
        )
        out.append(service)
    return out


async def run_chaos(cfg: ChaosConfig) -> ChaosReport:
    """Kill the aggregator ``cfg.kills`` times while the agents publish; return the audit."""
    started = time.monotonic()
    report = ChaosReport()
    rng = random.Random(cfg.seed)
    base = aggregator_config(cfg)
    observer = _Observer(cfg)
    observer_task = asyncio.create_task(observer.run())
    await asyncio.wait_for(observer.subscribed.wait(), 20)
    agents = _agents(cfg, base, observer)
    agent_stop = asyncio.Event()
    proc = await _start(cfg, observer)
    agent_tasks = [asyncio.create_task(a.run(agent_stop)) for a in agents]
    targets = ["aggregator"] * cfg.kills + ["broker"] * cfg.broker_kills
    rng.shuffle(targets)
    try:
        for target in targets:
            await asyncio.sleep(rng.uniform(*cfg.uptime))
            if target == "aggregator":
                proc.kill()  # SIGKILL: no checkpoint, no goodbye
                await proc.wait()
                report.kills += 1
                proc = await _start(cfg, observer)
            else:
                assert cfg.broker is not None, "broker_kills needs ChaosConfig.broker"
                observer.online.clear()
                cfg.broker.kill()  # every session, queue and retained message is gone
                await asyncio.to_thread(cfg.broker.start)
                report.broker_kills += 1
                await asyncio.wait_for(observer.online.wait(), 60)  # the aggregator is back
        await asyncio.sleep(rng.uniform(*cfg.uptime))
        for a in agents:  # no more training; deliver what is in the outboxes
            a.finish(cfg.drain_timeout)
        await asyncio.wait_for(asyncio.gather(*agent_tasks), cfg.drain_timeout + 30)
    finally:
        agent_stop.set()
        with contextlib.suppress(Exception):
            await asyncio.gather(*agent_tasks)
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)
        observer_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
            await observer_task
    report.undelivered = sum(len(a.outbox) for a in agents)
    report.resent = sum(a.stats.resent for a in agents)
    _audit(cfg, base, observer, report, agents)
    report.seconds = round(time.monotonic() - started, 1)
    return report


async def _start(cfg: ChaosConfig, observer: _Observer) -> asyncio.subprocess.Process:
    observer.online.clear()
    proc = await asyncio.create_subprocess_exec(*_aggregator_cmd(cfg), cwd=ROOT, stdout=asyncio.subprocess.DEVNULL)
    await asyncio.wait_for(observer.online.wait(), 60)  # it announces itself once subscribed
    return proc


def _audit(
    cfg: ChaosConfig, base: Config, observer: _Observer, report: ChaosReport, agents: list[AgentService]
) -> None:
    state = latest_checkpoint(cfg.workdir / "aggregator")
    if state is None:
        report.problems.append("no final checkpoint")
        return
    stats: dict[str, Any] = state["stats"]
    n = int(stats["accepted"])
    report.applied = n
    report.duplicates_dropped = int(stats["rejected"].get("duplicate", 0))
    report.rejected_other = sum(int(v) for k, v in stats["rejected"].items() if k != "duplicate")
    report.rejected_by_reason = {str(k): int(v) for k, v in stats["rejected"].items() if k != "duplicate"}
    report.retried = sum(int(v) for v in stats.get("retried", {}).values())
    report.updates_sent = sum(a.stats.updates_published for a in agents)
    report.receipted = len(observer.receipts)
    by_index: dict[int, tuple[str, int]] = {}
    for key, indexes in observer.receipts.items():
        if len(indexes) != 1:
            report.inconsistent_receipts += 1
            report.problems.append(f"{key} got receipts with indexes {sorted(indexes)}")
            continue
        (index,) = indexes
        if index in by_index:
            report.applied_twice += 1
            report.problems.append(f"index {index} receipted for {by_index[index]} and {key}")
        elif index > n:
            report.lost += 1
            report.problems.append(f"{key} receipted at index {index} but the state has only {n}")
        else:
            by_index[index] = key
    report.applied_without_receipt = n - len(by_index) - report.applied_twice
    # Replay the receipted updates in the order of application through a fresh core.
    oracle = AggregatorService(replace(base, aggregator=replace(base.aggregator, checkpoint_dir=None)))
    oracle.startup()
    core = oracle.core
    assert core is not None
    core.run_id = str(state["run"])  # the oracle replays as the audited run
    for index in sorted(by_index):
        agent, seq = by_index[index]
        payload = observer.updates.get((agent, seq))
        if payload is None:
            report.problems.append(f"no copy of receipted update {agent}/{seq}")
            return
        result = core.replay("update", update=UpdateMessage.from_bytes(payload), agent_id=agent)  # admitted once
        if not isinstance(result, Accepted) or result.index != index:
            report.problems.append(f"replay of {agent}/{seq} at {index} gave {result}")
            return
    weights = state["weights"]
    report.model_equals_replay = core.version == int(state["version"]) and all(
        weights[k].tobytes() == w.tobytes() for k, w in core.weights.items()
    )
    if not report.model_equals_replay:
        report.problems.append(f"replay ends at version {core.version}, the aggregator at {state['version']}")


def format_report(r: ChaosReport) -> str:
    """The figures as a small table."""
    rows = [
        ("aggregator kills survived (kill -9)", r.kills),
        ("broker kills survived (kill -9)", r.broker_kills),
        ("updates sent (distinct agent, seq)", r.updates_sent),
        ("re-sends by agents", r.resent),
        ("receipted as accepted", r.receipted),
        ("applied (final state)", r.applied),
        ("duplicates dropped", r.duplicates_dropped),
        ("rejected for other reasons", f"{r.rejected_other} {r.rejected_by_reason or ''}".strip()),
        ("answered retry (sent again later)", r.retried),
        ("lost (receipted, not applied)", r.lost),
        ("applied twice", r.applied_twice),
        ("applied without a receipt", r.applied_without_receipt),
        ("still in outboxes at the end", r.undelivered),
        ("final model == replay of receipts", r.model_equals_replay),
        ("seconds", r.seconds),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
