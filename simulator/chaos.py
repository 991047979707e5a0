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

Two more kinds of fault can be mixed in:

- ``checkpoint_disconnects``: the broker is killed (and restarted) the moment a checkpoint is
  being written (a watcher sees the checkpoint's temporary file, or a checkpoint whose log does
  not exist yet): the publisher fails, the session's TaskGroup cancels the task running the
  checkpoint, and the aggregator is often killed right after. This is how a receipted update
  was lost before the checkpoint step was made one shielded step.
- ``corruptions``: while the aggregator is down, one random bit of a random state file
  (checkpoints and logs of both kept generations) is flipped. A start on a copy must then either
  refuse with a named error, or give exactly the state a start on the unflipped copy gives
  (the bit was in something not needed: the previous generation, a torn tail). Anything else is
  counted as undetected. The flip is then undone and the real aggregator restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
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
from aggregator.wal import WalScan
from broker.launcher import MosquittoBroker
from edge_agent.service import AgentService
from edge_agent.trainer import LocalTrainer
from fedmq.config import AgentConfig, AggregatorConfig, BrokerConfig, Config, PrivacyConfig
from fedmq.errors import ConfigError
from fedmq.messages import ReceiptMessage, StatusMessage, UpdateMessage
from simulator.harness import SimConfig, split_task

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
    checkpoint_disconnects: int = 0
    """Broker kills timed to land while the aggregator writes a checkpoint (needs ``broker``)."""
    corruptions: int = 0
    """Bit flips in the state files between kills, each checked for detection (see the module docstring)."""
    model: str = "softmax"
    hidden: int = 64


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
    checkpoint_disconnects: int = 0
    """Broker kills that landed while a checkpoint was being written."""
    flips: int = 0
    flips_detected: int = 0
    """Refused at start with a named error (file, and offset for a log)."""
    flips_harmless: int = 0
    """Started, with the same state as without the flip."""
    flips_undetected: int = 0
    """Started with another state: must be 0."""
    detections: dict[str, int] = field(default_factory=dict)
    """What the named errors said (by kind), for the report."""
    harmless_where: dict[str, int] = field(default_factory=dict)
    """Where the harmless flips were: the previous generation (kept only to rebuild), a torn tail."""
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
            and self.flips_undetected == 0
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
            model=cfg.model,
            hidden=cfg.hidden,
            rate_limit=50.0,
        ),
    ).validate()


def _aggregator_cmd(cfg: ChaosConfig) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cli",
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
        "--model",
        cfg.model,
        "--rate-limit",
        "50",  # agents here send every 50 ms: the audit is about crashes, not flow control
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
        self.deferred: dict[tuple[str, int], bool] = {}
        self.online = asyncio.Event()
        self.subscribed = asyncio.Event()

    def on_receipt(self, receipt: ReceiptMessage, payload: bytes) -> None:
        key = (receipt.agent_id, receipt.seq)
        if receipt.status == "accepted" and receipt.index is not None:  # rejections: counted by the aggregator
            self.receipts.setdefault(key, set()).add(receipt.index)
            self.updates.setdefault(key, payload)
            self.deferred[key] = receipt.deferred is True

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
    shards, _ = split_task(sim)
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
    targets = (
        ["aggregator"] * cfg.kills
        + ["broker"] * cfg.broker_kills
        + ["disconnect"] * cfg.checkpoint_disconnects
        + ["corrupt"] * cfg.corruptions
    )
    rng.shuffle(targets)
    state = cfg.workdir / "aggregator"
    try:
        for target in targets:
            await asyncio.sleep(rng.uniform(*cfg.uptime))
            if target in ("aggregator", "corrupt"):
                proc.kill()  # SIGKILL: no checkpoint, no goodbye
                await proc.wait()
                report.kills += 1
                if target == "corrupt":
                    await asyncio.to_thread(_flip_and_classify, cfg, state, rng, report)
                proc = await _start(cfg, observer)
            elif target == "disconnect":
                assert cfg.broker is not None, "checkpoint_disconnects needs ChaosConfig.broker"
                hit = await asyncio.to_thread(_wait_for_checkpoint, state, 10.0)
                observer.online.clear()
                cfg.broker.kill()
                report.checkpoint_disconnects += hit
                if rng.random() < 0.5:  # and often the aggregator dies before the next checkpoint
                    proc.kill()
                    await proc.wait()
                    report.kills += 1
                    await asyncio.to_thread(cfg.broker.start)
                    proc = await _start(cfg, observer)
                else:
                    await asyncio.to_thread(cfg.broker.start)
                    report.broker_kills += 1
                    await asyncio.wait_for(observer.online.wait(), 60)
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
        if proc.returncode is None:  # (the loop above may have failed while it was down)
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


def _wait_for_checkpoint(state: Path, limit: float) -> bool:
    """Return as soon as a checkpoint is being written in ``state`` (True), or after ``limit`` s (False).

    Written: its temporary file exists, or a checkpoint exists whose log does not yet. Polled as
    fast as the folder can be listed: the whole step takes milliseconds.
    """
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError):
            names = os.listdir(state)
            if any(n.startswith(".checkpoint.") for n in names):
                return True
            gens = [n.split(".", 1)[1] for n in names if n.startswith("checkpoint.")]
            if any(f"wal.{g}" not in names for g in gens):
                return True
    return False


def _flip_and_classify(cfg: ChaosConfig, state: Path, rng: random.Random, report: ChaosReport) -> None:
    """Flip one bit of one state file; a start must refuse it by name or not be affected by it."""
    files = sorted(p for p in state.iterdir() if p.is_file() and p.name.split(".")[0] in ("checkpoint", "wal"))
    if not files:
        return
    victim = rng.choice(files)
    data = bytearray(victim.read_bytes())
    if not data:
        return
    at = rng.randrange(len(data))
    ckpts = [int(p.name.split(".")[1]) for p in files if p.name.startswith("checkpoint.")]
    current = max(ckpts, default=0)
    where = "current generation" if int(victim.name.split(".")[1]) >= current else "previous generation"
    original = bytes(data)
    intact_end = _intact_end(victim) if victim.name.startswith("wal.") else len(data)
    clean = state.parent / "clean-copy"
    flipped = state.parent / "flipped-copy"
    for d in (clean, flipped):
        shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(state, clean)
    data[at] ^= 1 << rng.randrange(8)
    victim.write_bytes(bytes(data))
    shutil.copytree(state, flipped)
    report.flips += 1
    try:
        expected = _started_state(cfg, clean)
        try:
            got = _started_state(cfg, flipped)
        except ConfigError as exc:  # the start refused it, and said why
            report.flips_detected += 1
            kind = "checksum" if "SHA-256" in str(exc) else "log record" if "offset" in str(exc) else "other"
            report.detections[kind] = report.detections.get(kind, 0) + 1
            return
        if got == expected:
            report.flips_harmless += 1
            torn = where == "current generation" and at >= intact_end
            kind = "a torn tail" if torn else where
            report.harmless_where[kind] = report.harmless_where.get(kind, 0) + 1
        else:
            report.flips_undetected += 1
            report.problems.append(f"a flip in {victim.name} at byte {at} started with another state")
    finally:
        victim.write_bytes(original)  # undo the flip before the real aggregator starts again
        # (not from clean-copy: the trial start there checkpoints and prunes what it started from)
        shutil.rmtree(flipped, ignore_errors=True)
        shutil.rmtree(clean, ignore_errors=True)


def _intact_end(path: Path) -> int:
    """Where the intact records of a log end (after it: an incomplete last record)."""
    scan = WalScan(path)
    for _ in scan.records():
        pass
    return scan.end


def _started_state(cfg: ChaosConfig, directory: Path) -> tuple[int, int, bytes]:
    """What a start from ``directory`` gives: version, updates applied, the model's bytes."""
    base = aggregator_config(cfg)
    svc = AggregatorService(replace(base, aggregator=replace(base.aggregator, checkpoint_dir=str(directory))))
    core = svc.startup()
    if svc.store is not None:
        svc.store.close()
    return core.version, core.stats.accepted, b"".join(core.weights[k].tobytes() for k in sorted(core.weights))


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
    report.duplicates_dropped = int(stats.get("duplicates", 0)) + int(stats["rejected"].get("duplicate", 0))
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
        held = observer.deferred.get((agent, seq), False)  # the receipt says whether it waited a buffer
        result = core.replay("update", update=UpdateMessage.from_bytes(payload), agent_id=agent, deferred=held)
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
        ("broker kills during a checkpoint", r.checkpoint_disconnects),
        ("bit flips in the state files", r.flips),
        ("  refused at start, named", f"{r.flips_detected} {r.detections or ''}".strip()),
        ("  harmless (same state)", f"{r.flips_harmless} {r.harmless_where or ''}".strip()),
        ("  undetected", r.flips_undetected),
        ("lost (receipted, not applied)", r.lost),
        ("applied twice", r.applied_twice),
        ("applied without a receipt", r.applied_without_receipt),
        ("still in outboxes at the end", r.undelivered),
        ("final model == replay of receipts", r.model_equals_replay),
        ("seconds", r.seconds),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
