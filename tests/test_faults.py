"""Tier 3, issue 11: faults that need real processes, a real broker or a real file system.

- a rollback of the aggregator's state (a fresh start) while agents run;
- a full disk under a running ``fedmq aggregator``;
- SIGTERM while an agent is in the middle of a long local round;
- SIGTERM to both roles while the broker hangs (SIGSTOP).

Time limits here are bounds with wide margins (a minute for a grace period of seconds), never
speed measurements.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import aiomqtt
import numpy as np
import pytest

from broker.launcher import MosquittoBroker
from edge_agent.service import AgentService
from edge_agent.trainer import LocalTrainer
from fedmq.config import AgentConfig, AggregatorConfig, BrokerConfig, Config, PrivacyConfig
from fedmq.messages import ReceiptMessage, UpdateMessage
from models.datasets import digits
from tests.conftest import require_mosquitto
from tests.helpers import StderrTap, payload, start_aggregator, wait_until

pytestmark = [pytest.mark.broker, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]


def agent_service(cfg: Config, agent_id: str, **agent: object) -> AgentService:
    train, _ = digits()
    acfg = AgentConfig(agent_id=agent_id, round_interval=0.05, receipt_timeout=2.0, **agent)  # type: ignore[arg-type]
    rng = np.random.default_rng(abs(hash(agent_id)) % 1000)
    trainer = LocalTrainer(acfg, PrivacyConfig(noise_multiplier=1.0), train.subset(rng.choice(len(train), 60)), rng=rng)
    return AgentService(replace(cfg, agent=acfg), trainer)


# --- 4. a rollback must not stall running agents -------------------------------------------------
async def test_agents_follow_an_aggregator_that_started_afresh(
    mosquitto: MosquittoBroker, prefix: str, tmp_path: Path
) -> None:
    """A fresh start is version 0 of a new run. The agents must follow it (they used to ignore a
    version lower than one they had seen: 0 of 222 updates accepted), and once an agent trains on
    the new run it never sends an update of the old one again (no budget spent for nothing)."""
    base = Config(
        prefix=prefix,
        broker=BrokerConfig(host=mosquitto.host, port=mosquitto.port),
        aggregator=AggregatorConfig(rule="fedbuff", buffer_size=2, checkpoint_dir=str(tmp_path / "one")),
    ).validate()
    sent: list[UpdateMessage] = []
    observer = asyncio.create_task(_observe_updates(mosquitto, prefix, sent))
    first, stop1, task1 = await start_aggregator(base)
    agents = [agent_service(base, f"roll-{i}") for i in range(3)]
    agent_stop = asyncio.Event()
    agent_tasks = [asyncio.create_task(a.run(agent_stop)) for a in agents]
    assert first.core is not None
    await wait_until(first.pulse, lambda: first.core.version >= 6, limit=60)  # type: ignore[union-attr]
    stop1.set()
    await task1
    # The operator starts afresh (another, empty state folder): version 0 of a new run.
    fresh = replace(base, aggregator=replace(base.aggregator, checkpoint_dir=str(tmp_path / "two")))
    second, stop2, task2 = await start_aggregator(fresh)
    assert second.core is not None and second.run_id != first.run_id
    try:
        await wait_until(second.pulse, lambda: second.core.stats.accepted >= 6, limit=60)  # type: ignore[union-attr]
    finally:
        stop2.set()
        agent_stop.set()
        await asyncio.gather(task2, *agent_tasks)
        observer.cancel()
    assert set(second.core.stats.rejected) <= {"wrong_run", "unknown_base_version", "too_stale"}
    for a in agents:
        mine = [u for u in sent if u.agent_id == a.agent_id]
        switch = next(i for i, u in enumerate(mine) if u.base_run == second.run_id)
        late = [u for u in mine[switch:] if u.base_run != second.run_id]
        assert late == [], f"{a.agent_id} sent {len(late)} updates of the old run after following the new one"
        assert mine[0].base_run == first.run_id


async def _observe_updates(broker: MosquittoBroker, prefix: str, into: list[UpdateMessage]) -> None:
    async with aiomqtt.Client(broker.host, broker.port) as client:
        await client.subscribe(f"{prefix}/update/+", qos=1)
        async for msg in client.messages:
            into.append(UpdateMessage.from_bytes(payload(msg)))


# --- 6. a full disk ----------------------------------------------------------------------------
@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs (needs root, as CI has)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.fail(f"mounting a tmpfs needs root: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_a_full_disk_is_named_and_waited_out_without_a_crash(
    mosquitto: MosquittoBroker, prefix: str, tiny_fs: Path, tmp_path: Path
) -> None:
    state = tiny_fs / "state"
    log = tmp_path / "aggregator.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "aggregator", "--broker", f"mqtt://{mosquitto.host}:{mosquitto.port}",
         "--prefix", prefix, "--buffer-size", "4", "--checkpoint-dir", str(state), "--checkpoint-every", "2"],
        cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    tap = StderrTap(proc, log)
    filler = tiny_fs / "filler"
    try:
        receipts = await Receipts.start(mosquitto, prefix)
        await receipts.wait_online(60)
        zeros = {"W": np.zeros((64, 10), np.float32), "b": np.zeros(10, np.float32)}
        seq = 0

        async def publish_until(status: str, limit: float) -> int:
            nonlocal seq
            deadline = time.monotonic() + limit
            while time.monotonic() < deadline:
                seq += 1
                u = UpdateMessage(f"d{seq % 50}", seq, 0, 8, zeros)
                await receipts.client.publish(f"{prefix}/update/d{seq % 50}", u.to_bytes(), qos=1)
                got = await receipts.next_for(u.agent_id, seq, 2.0)
                if got is not None and got.status == status:
                    return seq
            raise AssertionError(f"no {status} receipt within {limit} s")

        await publish_until("accepted", 30)
        with open(filler, "wb", buffering=0) as fh, contextlib.suppress(OSError):  # fill it to the last block
            while True:
                fh.write(b"\0" * 65536)
        for _ in range(20):  # these find no room: no receipt, and the process lives
            seq += 1
            u = UpdateMessage(f"d{seq % 50}", seq, 0, 8, zeros)
            await receipts.client.publish(f"{prefix}/update/d{seq % 50}", u.to_bytes(), qos=1)
        await asyncio.to_thread(tap.wait_for, "no space", 30)
        assert proc.poll() is None, log.read_text()
        text = log.read_text()
        assert str(state) in text and "bytes" in text, text
        assert "Traceback" not in text, text
        filler.unlink()
        await publish_until("accepted", 60)  # it takes updates again, without a restart
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 60)
        with contextlib.suppress(Exception):
            await receipts.stop()  # type: ignore[possibly-undefined]


class Receipts:
    """A receipts-only connection (the agents' view) and the aggregator's liveness."""

    def __init__(self, client: aiomqtt.Client, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self.got: dict[tuple[str, int], ReceiptMessage] = {}
        self.online = asyncio.Event()
        self.changed = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, broker: MosquittoBroker, prefix: str) -> Receipts:
        client = aiomqtt.Client(broker.host, broker.port)
        await client.__aenter__()
        self = cls(client, prefix)
        await client.subscribe(f"{prefix}/receipt/+", qos=1)
        await client.subscribe(f"{prefix}/server/status", qos=1)
        self.task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        from fedmq.messages import StatusMessage

        async for msg in self.client.messages:
            if msg.topic.value.endswith("/server/status"):
                if payload(msg) and StatusMessage.from_bytes(payload(msg)).state == "online":
                    self.online.set()
                continue
            r = ReceiptMessage.from_bytes(payload(msg))
            self.got[(r.agent_id, r.seq)] = r
            self.changed.set()

    async def wait_online(self, limit: float) -> None:
        await asyncio.wait_for(self.online.wait(), limit)

    async def next_for(self, agent: str, seq: int, limit: float) -> ReceiptMessage | None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(limit):
                while (agent, seq) not in self.got:
                    self.changed.clear()
                    await self.changed.wait()
        return self.got.get((agent, seq))

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        await self.client.__aexit__(None, None, None)


# --- 7. bounded shutdown -------------------------------------------------------------------------
def agent_cmd(broker: MosquittoBroker, prefix: str, agent_id: str, *extra: str) -> list[str]:
    url = f"mqtt://{broker.host}:{broker.port}"
    return [sys.executable, "-m", "cli", "agent", "--broker", url, "--prefix", prefix, "--id", agent_id,
            "--data", "builtin:digits-train", "--log-level", "WARNING", *extra]  # fmt: skip


async def test_sigterm_abandons_a_long_local_round_without_releasing(
    mosquitto: MosquittoBroker, prefix: str, tmp_path: Path
) -> None:
    cfg = Config(prefix=prefix, broker=BrokerConfig(host=mosquitto.host, port=mosquitto.port)).validate()
    server, stop, task = await start_aggregator(cfg)
    state = tmp_path / "agent"
    # 100,000 epochs over 1,437 examples: about 5 minutes of training for one round here.
    proc = subprocess.Popen(
        agent_cmd(
            mosquitto, prefix, "slow-pi", "--epochs", "100000", "--state-dir", str(state), "--log-level", "DEBUG"
        ),
        cwd=ROOT,
        stderr=subprocess.PIPE,
    )
    tap = StderrTap(proc, tmp_path / "agent.log")
    try:
        assert server.core is not None
        await wait_until(server.pulse, lambda: "slow-pi" in server.core.online, limit=60)  # type: ignore[union-attr]
        await asyncio.to_thread(tap.wait_for, "a local round on version", 120)  # it is in the round
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        code = await asyncio.to_thread(proc.wait, 60)
        assert code == 0
        assert time.monotonic() - started < 30  # the default grace is seconds; the round, minutes
    finally:
        if proc.poll() is None:
            proc.kill()
        stop.set()
        await task
    assert "slow-pi" not in server.core.last_seq  # nothing was released ...
    assert not list((state / "slow-pi.outbox").glob("*.update"))  # ... or staged


async def test_both_roles_stop_within_their_grace_while_the_broker_hangs(tmp_path: Path, prefix: str) -> None:
    require_mosquitto()
    broker = MosquittoBroker(workdir=tmp_path / "broker")
    broker.start()
    url = f"mqtt://{broker.host}:{broker.port}"
    env = os.environ | {"FEDMQ_AGGREGATOR__SHUTDOWN_GRACE": "1", "FEDMQ_AGENT__SHUTDOWN_GRACE": "1"}
    agg_log, agent_log = tmp_path / "aggregator.log", tmp_path / "agent.log"
    with agg_log.open("w") as agg_err, agent_log.open("w") as agent_err:
        agg = subprocess.Popen(
            [sys.executable, "-m", "cli", "aggregator", "--broker", url, "--prefix", prefix,
             "--log-level", "WARNING"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=agg_err, env=env,
        )  # fmt: skip
        agent = subprocess.Popen(
            agent_cmd(broker, prefix, "hang-pi", "--round-interval", "0.2"),
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=agent_err, env=env,
        )  # fmt: skip
    try:
        async with aiomqtt.Client(broker.host, broker.port) as watch:  # wait until both are connected and working
            await watch.subscribe(f"{prefix}/receipt/hang-pi", qos=1)
            async with asyncio.timeout(60):
                await anext(aiter(watch.messages))
        assert broker.proc is not None
        os.kill(broker.proc.pid, signal.SIGSTOP)  # the broker hangs: TCP stays open, nothing is answered
        started = time.monotonic()
        agg.send_signal(signal.SIGTERM)
        agent.send_signal(signal.SIGTERM)
        codes = await asyncio.gather(asyncio.to_thread(agg.wait, 60), asyncio.to_thread(agent.wait, 60))
        elapsed = time.monotonic() - started
        assert codes == [0, 0]
        # Each ended by its grace (1 s), which says so in its log; without it aiomqtt alone waits
        # 10 s for a PUBACK and 10 s more for the DISCONNECT. The bound leaves room for a busy machine.
        assert "did not answer within aggregator.shutdown_grace" in agg_log.read_text(), agg_log.read_text()
        assert "did not answer within the shutdown grace" in agent_log.read_text(), agent_log.read_text()
        assert elapsed < 9.5, elapsed
    finally:
        for p in (agg, agent):
            if p.poll() is None:
                p.kill()
        if broker.proc is not None:
            os.kill(broker.proc.pid, signal.SIGCONT)
        broker.cleanup()
