"""Sharded aggregation on a 3-node loopback NATS cluster, with real `fedmq agent` processes.

Two `fedmq aggregator --nats` shard processes share the update stream; one leads. Devices
connect to different nodes. Mid-run the leading shard is killed with SIGKILL, then a NATS node,
which is restarted later; a third shard joins. The audit is the chaos tests' own: every
update a device got an ``accepted`` receipt for went into exactly one committed version, the
one the receipt names, and no update went into two. An auditor on a node that is never killed
watches every commit and every receipt.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import msgpack
import numpy as np
import pytest

from broker.nats import NatsCluster
from fedmq.messages import ModelMessage, ReceiptMessage, UpdateMessage
from models.datasets import digits
from tests.helpers import StderrTap
from tests.test_cluster import cluster as cluster

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parents[1]
PREFIX = "fedmq/sharded"
UPDATES_EACH = 40


class Auditor:
    """Every commit (the whole commit log) and every receipt, from a node that stays up (own thread and loop)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.commits: dict[int, list[tuple[str, int]]] = {}
        self.refused: dict[int, list[tuple[str, int]]] = {}
        self.receipts: list[ReceiptMessage] = []
        self.sent: set[tuple[str, int]] = set()
        self.changed = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self.ready = threading.Event()
        self.error: BaseException | None = None

    @property
    def version(self) -> int:
        return max(self.commits, default=-1)

    async def _main(self) -> None:
        import nats

        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()  # type: ignore[assignment]
        nc = None
        try:
            nc = await nats.connect(self.url, max_reconnect_attempts=-1)
            js = nc.jetstream()

            async def on_receipt(msg: object) -> None:
                r = ReceiptMessage.from_bytes(msg.data)  # type: ignore[attr-defined]
                with self.changed:
                    self.receipts.append(r)
                    self.changed.notify_all()

            async def on_update(msg: object) -> None:
                u = UpdateMessage.from_bytes(msg.data)  # type: ignore[attr-defined]
                with self.changed:
                    self.sent.add((u.agent_id, u.seq))

            await nc.subscribe(PREFIX.replace("/", ".") + ".receipt.*", cb=on_receipt)
            await nc.subscribe(PREFIX.replace("/", ".") + ".update.*", cb=on_update)
            from nats.errors import Error as NatsError
            from nats.js.api import DeliverPolicy

            # The first shard creates the commit log before it can lead, and the leader announces
            # each version on its subject: a plain subscription made first hears the first
            # announcement, after which the log exists (an event to wait on, not a poll).
            subject = PREFIX.replace("/", ".") + ".cluster.commit"
            announced = asyncio.Event()

            async def on_announcement(_msg: object) -> None:
                announced.set()

            first = await nc.subscribe(subject, cb=on_announcement)
            try:
                sub = await js.subscribe(subject, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
            except NatsError:  # no shard has made the log yet (or JetStream is still electing its leader)
                await announced.wait()
                sub = await js.subscribe(subject, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
            await first.unsubscribe()
            self.ready.set()
            async for msg in sub.messages:
                obj = msgpack.unpackb(msg.data, raw=False)
                with self.changed:
                    keys = [(str(a), int(s)) for a, s in obj["keys"]]
                    self.refused[int(obj["version"])] = [(str(a), int(s)) for a, s in obj.get("refused", [])]
                    previous = self.commits.setdefault(int(obj["version"]), keys)
                    if previous != keys:  # announced again by a new leader: must be the same step
                        self.error = AssertionError(f"version {obj['version']}: {previous} then {keys}")
                    self.changed.notify_all()
        except asyncio.CancelledError:
            pass  # stop()
        except BaseException as exc:
            self.error = exc
            self.ready.set()
            with self.changed:
                self.changed.notify_all()
        finally:
            if nc is not None:  # else its reconnect loop outlives the cluster and logs at exit
                await nc.close()

    def start(self) -> Auditor:
        self.thread.start()
        assert self.ready.wait(120), "the auditor did not start"
        assert self.error is None, self.error
        return self

    def stop(self) -> None:
        """Cancel the reader and close its connection (from the test's thread)."""
        if self._loop is not None and self._task is not None and self.thread.is_alive():
            self._loop.call_soon_threadsafe(self._task.cancel)
        self.thread.join(60)

    def wait(self, what: str, predicate: object, limit: float) -> None:
        deadline = time.monotonic() + limit
        with self.changed:
            while not predicate():  # type: ignore[operator]
                assert self.error is None, self.error
                left = deadline - time.monotonic()
                assert left > 0, f"{what}: not within {limit} s (version {self.version})"
                self.changed.wait(left)


@pytest.fixture
def auditors() -> Iterator[list[Auditor]]:
    """Auditors to stop at the end, pass or fail."""
    started: list[Auditor] = []
    yield started
    for a in started:
        a.stop()


ROOT_ENV = {"FEDMQ_AGGREGATOR__SHARD__REPLICAS": "1"}


@dataclass
class RootAndSite:
    """A one-node NATS root with one shard (its leader) and an auditor, and a site's Mosquitto."""

    node: Any
    urls: str
    auditor: Auditor
    site_broker: Any


@pytest.fixture
def root_and_site(
    request: pytest.FixtureRequest, tmp_path: Path, processes: list[subprocess.Popen[bytes]], auditors: list[Auditor]
) -> Iterator[RootAndSite]:
    """The root serving (version 0 committed); both stopped at the end, pass or fail.

    Parametrized indirectly, the value is the root's FedBuff K (4 otherwise).
    """
    from broker.launcher import MosquittoBroker

    if not (shutil.which("nats-server") or Path("/usr/sbin/nats-server").exists()):
        pytest.skip("nats-server is not installed (apt-get install nats-server)")
    root = NatsCluster(1, workdir=tmp_path / "nats").start(timeout=120)
    site_broker = MosquittoBroker().start()
    try:
        node = root.nodes[0]
        urls = f"nats://{node.host}:{node.client_port}"
        k = str(getattr(request, "param", 4))
        processes.append(shard(urls, node.url, tmp_path / "root.log", ROOT_ENV, extra=("--buffer-size", k)))
        auditor = Auditor(urls)
        auditors.append(auditor)
        auditor.start()
        auditor.wait("version 0", lambda: 0 in auditor.commits, 120)
        yield RootAndSite(node, urls, auditor, site_broker)
    finally:
        site_broker.cleanup()
        root.cleanup()


def shard(
    nats_urls: str,
    broker: str,
    log: Path,
    env: dict[str, str] | None = None,
    *,
    site: bool = False,
    max_staleness: int = 1000,
    extra: tuple[str, ...] = (),
    tap: bool = False,
) -> subprocess.Popen[bytes]:
    """A `fedmq aggregator --nats` process (a shard, or with ``site`` a site aggregator).

    Its stderr goes to ``log``; with ``tap`` it is a pipe for a :class:`~tests.helpers.StderrTap` to write there.
    """
    full = {
        **os.environ,
        "FEDMQ_AGGREGATOR__SHARD__LEASE": "2",
        "FEDMQ_AGGREGATOR__SHARD__ACK_WAIT": "4",
        "FEDMQ_AGGREGATOR__HTTP": "",
        **(env or {}),
    }
    cmd = [
        sys.executable, "-m", "cli", "aggregator", "--nats", nats_urls, "--broker", broker, "--prefix", PREFIX,
        "--model", "softmax", "--num-features", "64", "--num-classes", "10", "--buffer-size", "4",
        "--partial-size", "2", "--max-staleness", str(max_staleness), *(["--site"] if site else []), *extra,
    ]  # fmt: skip
    stderr = subprocess.PIPE if tap else log.open("wb")
    return subprocess.Popen(cmd, cwd=ROOT, env=full, stdout=subprocess.PIPE, stderr=stderr)


def test_shards_train_exactly_once_through_a_shard_kill_and_a_node_kill(
    cluster: NatsCluster,
    tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],
    auditors: list[Auditor],
) -> None:
    n1, n2, n3 = cluster.nodes
    urls = ",".join(f"nats://{n.host}:{n.client_port}" for n in cluster.nodes)
    shards = [shard(urls, n1.url, tmp_path / f"shard{i}.log") for i in range(2)]
    processes.extend(shards)
    auditor = Auditor(f"nats://{n1.host}:{n1.client_port}")
    auditors.append(auditor)
    auditor.start()
    auditor.wait("version 0", lambda: 0 in auditor.commits, 120)

    agents = start_agents(tmp_path, [n.url for n in (n2, n2, n3, n3)], max_updates=UPDATES_EACH, receipt_timeout=5)
    processes.extend(agents)

    # 1. The leading shard dies (SIGKILL) once the federation is under way; another takes over.
    auditor.wait("two versions", lambda: auditor.version >= 2, 180)
    newest_lead = max(_leads(tmp_path))  # log lines begin with their time
    leader = next(p for p in shards if f"-{p.pid}-" in newest_lead)
    leader.send_signal(signal.SIGKILL)
    leader.wait(30)
    at_kill = auditor.version
    auditor.wait("a version after the leader's death", lambda: auditor.version >= at_kill + 2, 180)

    # 2. A NATS node dies under two devices and the shards; it comes back; a third shard joins.
    cluster.kill(2)
    at_node = auditor.version
    processes.append(shard(urls, n1.url, tmp_path / "shard2.log"))
    auditor.wait("a version without the node", lambda: auditor.version >= at_node + 1, 180)
    cluster.restart(2, timeout=120)
    at_restart = auditor.version

    # 3. The devices on the restarted node get the newest model and train on: receipts of theirs
    #    for versions made after it came back.
    def back(agent: str) -> bool:
        return any(r.agent_id == agent and r.status == "accepted" and r.version > at_restart for r in auditor.receipts)

    auditor.wait("dev2 and dev3 back", lambda: back("dev2") and back("dev3"), 240)

    stats = []
    for i, a in enumerate(agents):
        out, _ = a.communicate(timeout=300)
        assert a.returncode == 0, (tmp_path / f"dev{i}.log").read_text()[-3000:]
        stats.append(json.loads(out.decode().strip().splitlines()[-1]))
    assert all(s["receipts_accepted"] >= 1 for s in stats), stats

    # The audit: every accepted receipt names the one version its update went into; no update twice.
    assert auditor.error is None, auditor.error
    with auditor.changed:
        assert sorted(auditor.commits) == list(range(auditor.version + 1)), "the commit log has a gap"
        applied = _applied_once(auditor.commits, auditor.receipts)
        assert set(applied) <= auditor.sent, set(applied) - auditor.sent  # nothing applied that no device sent
        # What a device holds no receipt for when it stops sat in the last buffer, short of K.
        assert len(applied) >= sum(s["receipts_accepted"] for s in stats) > 0
    # The newest model is retained on every node, the restarted one too.
    newest = auditor.version
    assert asyncio.run(_retained_version(n3.host, n3.mqtt_port)) >= newest - 1


def _applied_once(
    commits: dict[int, list[tuple[str, int]]], receipts: list[ReceiptMessage]
) -> dict[tuple[str, int], int]:
    """The audit: no update in two versions, and every accepted receipt names its update's version."""
    applied: dict[tuple[str, int], int] = {}
    for version, keys in commits.items():
        for key in keys:
            assert key not in applied, f"{key} went into versions {applied[key]} and {version}"
            applied[key] = version
    for r in receipts:
        if r.status == "accepted":
            went = applied.get((r.agent_id, r.seq))
            assert went == r.version, f"receipt {r} names a version, the update went into {went}"
    return applied


def _leads(folder: Path) -> list[str]:
    return [line for f in sorted(folder.glob("shard*.log")) for line in f.read_text().splitlines() if " leads" in line]


async def _retained_version(host: str, port: int) -> int:
    """The retained model's version as a new device on that node sees it.

    A restarted node accepts MQTT connections only once its MQTT streams have caught up, which
    on a busy machine takes longer than aiomqtt's 10 s connect timeout: connect again, for up to
    three minutes.
    """
    deadline = time.monotonic() + 180
    while True:
        try:
            async with aiomqtt.Client(host, port, identifier="late-reader", timeout=60) as client:
                await client.subscribe(f"{PREFIX}/model", qos=1)
                async with asyncio.timeout(120):
                    async for msg in client.messages:
                        assert isinstance(msg.payload, (bytes, bytearray))
                        return ModelMessage.from_bytes(bytes(msg.payload)).version
        except aiomqtt.MqttError:
            if time.monotonic() > deadline:
                raise


def test_a_site_forwards_only_sums_and_its_devices_are_applied_exactly_once(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]], root_and_site: RootAndSite
) -> None:
    """Two devices on a site's own Mosquitto, one on the root cluster. The site aggregator
    forwards partial sums; it is killed with SIGKILL mid-run and started again. The root never
    carries a site device's update; every accepted receipt, at the site or at the root, names
    the one version its update went into."""
    node, urls, env = root_and_site.node, root_and_site.urls, ROOT_ENV
    auditor, site_broker = root_and_site.auditor, root_and_site.site_broker
    site_url = f"mqtt://{site_broker.host}:{site_broker.port}"
    site = shard(urls, site_url, tmp_path / "site.log", env, site=True)
    processes.append(site)
    site_receipts = SiteReceipts(site_broker.host, site_broker.port).start()

    agents = start_agents(tmp_path, [site_url, site_url, node.url])
    processes.extend(agents)
    auditor.wait("three versions", lambda: auditor.version >= 3, 180)
    site.send_signal(signal.SIGKILL)
    site.wait(30)
    at_kill = auditor.version
    processes.append(shard(urls, site_url, tmp_path / "site2.log", env, site=True))
    site_receipts.wait_for(lambda got: any(r.version > at_kill + 1 for r in got), 180)

    for i, a in enumerate(agents):
        a.communicate(timeout=300)
        assert a.returncode == 0, (tmp_path / f"dev{i}.log").read_text()[-3000:]
    assert auditor.error is None, auditor.error
    with auditor.changed:
        applied = _applied_once(auditor.commits, site_receipts.got + auditor.receipts)
        assert {a for a, _ in auditor.sent} <= {"dev2"}, "a site device's update crossed to the root"
        site_devices = {a for a, _ in applied} & {"dev0", "dev1"}
        assert site_devices == {"dev0", "dev1"}, "the site's sums were applied"
    accepted = [r for r in site_receipts.got + auditor.receipts if r.status == "accepted"]
    assert {r.agent_id for r in accepted} == {"dev0", "dev1", "dev2"}


class SiteReceipts:
    """The receipts the site sends its devices (a subscriber on the site's broker, own thread)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.got: list[ReceiptMessage] = []
        self.changed = threading.Condition()
        self.ready = threading.Event()
        threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True).start()

    async def _main(self) -> None:
        with contextlib.suppress(aiomqtt.MqttError):  # the site's broker stops at the end of the test
            async with aiomqtt.Client(self.host, self.port, identifier="site-audit") as client:
                await client.subscribe(f"{PREFIX}/receipt/+", qos=1)
                self.ready.set()
                async for msg in client.messages:
                    assert isinstance(msg.payload, (bytes, bytearray))
                    with self.changed:
                        self.got.append(ReceiptMessage.from_bytes(bytes(msg.payload)))
                        self.changed.notify_all()

    def start(self) -> SiteReceipts:
        assert self.ready.wait(60)
        return self

    def wait_for(self, predicate: Any, limit: float) -> None:
        deadline = time.monotonic() + limit
        with self.changed:
            while not predicate(self.got):
                left = deadline - time.monotonic()
                assert left > 0, f"not within {limit} s: {len(self.got)} receipts"
                self.changed.wait(left)


def test_a_too_stale_update_is_refused_once_through_the_commit_log(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]], auditors: list[Auditor]
) -> None:
    """Two shards, ``max_staleness`` 1. An update based on version 0 arrives at version 3, and its
    device sends it again: it is refused with the next committed step (the commit log lists it),
    and every receipt for it, one per copy at most, says ``rejected``, ``too_stale``."""
    if not (shutil.which("nats-server") or Path("/usr/sbin/nats-server").exists()):
        pytest.skip("nats-server is not installed (apt-get install nats-server)")
    from models import create_model

    root = NatsCluster(1, workdir=tmp_path / "nats").start(timeout=120)
    try:
        node = root.nodes[0]
        urls = f"nats://{node.host}:{node.client_port}"
        env = {"FEDMQ_AGGREGATOR__SHARD__REPLICAS": "1"}
        for i in range(2):
            processes.append(shard(urls, node.url, tmp_path / f"shard{i}.log", env, max_staleness=1))
        auditor = Auditor(urls)
        auditors.append(auditor)
        auditor.start()
        auditor.wait("version 0", lambda: 0 in auditor.commits, 120)
        weights = create_model("softmax", num_features=64, num_classes=10).get_weights()

        def update(agent: str, seq: int, base: int) -> bytes:
            delta = {k: np.full_like(v, 0.01) for k, v in weights.items()}
            return UpdateMessage(agent, seq, base, 10, delta).to_bytes()

        async def drive() -> None:
            async with aiomqtt.Client(node.host, node.mqtt_port, identifier="driver", timeout=60) as client:

                async def step(version: int) -> None:  # four fresh updates (K = 4): one more version
                    for i in range(4):
                        await client.publish(f"{PREFIX}/update/fresh{i}", update(f"fresh{i}", version, version), qos=1)
                    await asyncio.to_thread(
                        auditor.wait, f"version {version + 1}", lambda: auditor.version > version, 120
                    )

                for v in range(3):
                    await step(v)
                late = update("late", 1, 0)  # staleness 3 > 1
                await client.publish(f"{PREFIX}/update/late", late, qos=1)
                await client.publish(f"{PREFIX}/update/late", late, qos=1)  # sent again: its receipt was late
                await step(3)

        asyncio.run(drive())

        def answered() -> bool:
            return any(r.agent_id == "late" for r in auditor.receipts)

        auditor.wait("the late update's answer", answered, 120)
        with auditor.changed:
            refused_in = [v for v, keys in auditor.refused.items() if ("late", 1) in keys]
            assert refused_in == [4], auditor.refused  # committed once, with the step after it came
            assert all(("late", 1) not in keys for keys in auditor.commits.values())
            answers = [r for r in auditor.receipts if r.agent_id == "late"]
        assert 1 <= len(answers) <= 2 and {(r.status, r.reason) for r in answers} == {("rejected", "too_stale")}
    finally:
        for p in processes:  # before the cluster: a shard left running would log its reconnects
            p.kill()
            p.wait(30)
        root.stop()


def start_agents(
    tmp_path: Path, brokers: Sequence[str], *extra: str, max_updates: int = 30, receipt_timeout: float = 4
) -> list[subprocess.Popen[bytes]]:
    """One `fedmq agent` per entry of ``brokers`` (device i on broker i), 200 digits examples each."""
    train, _ = digits()
    agents = []
    for i, broker in enumerate(brokers):
        data = tmp_path / f"dev{i}.npz"
        part = train.subset(np.arange(i, 200 * len(brokers), len(brokers)))
        np.savez(data, x=part.x, y=part.y)
        cmd = [
            sys.executable, "-m", "cli", "agent", "--broker", broker, "--prefix", PREFIX, "--id", f"dev{i}",
            "--data", str(data), "--no-dp", "--max-updates", str(max_updates), "--round-interval", "0.3",
            "--lr", "0.3", "--receipt-timeout", str(receipt_timeout), *extra,
        ]  # fmt: skip
        agents.append(
            subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=(tmp_path / f"dev{i}.log").open("wb"))
        )
    return agents


def secure_site_agents(tmp_path: Path, site_url: str, *extra: str) -> list[subprocess.Popen[bytes]]:
    """Four agents on a site's broker that require secure aggregation."""
    return start_agents(tmp_path, [site_url] * 4, "--require-secure-aggregation", "--checkin-interval", "0.5", *extra)


def stop_site_and_agents(
    tmp_path: Path, site: subprocess.Popen[bytes], agents: list[subprocess.Popen[bytes]]
) -> dict[str, Any]:
    """SIGTERM the agents (each must exit 0), then the site; the site's summary."""
    for a in agents:
        a.send_signal(signal.SIGTERM)
    for i, a in enumerate(agents):
        a.communicate(timeout=120)
        assert a.returncode == 0, (tmp_path / f"dev{i}.log").read_text()[-3000:]
    site.send_signal(signal.SIGTERM)
    out, _ = site.communicate(timeout=120)
    summary: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return summary


def test_a_secure_site_on_nats_forwards_only_its_cohorts_sums(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]], root_and_site: RootAndSite
) -> None:
    """``--site --nats --secure-aggregation``: four devices that require secure aggregation on the
    site's Mosquitto. The site serves them cohorts and offers only each cohort's sum: no device
    update crosses to the root, the root's commits hold the site's devices' updates, and every
    accepted receipt at the site names the version its update went into."""
    urls, env = root_and_site.urls, ROOT_ENV
    auditor, site_broker = root_and_site.auditor, root_and_site.site_broker
    site_url = f"mqtt://{site_broker.host}:{site_broker.port}"
    secure = ("--secure-aggregation", "--cohort-size", "3", "--overselect", "0.34")
    site = shard(urls, site_url, tmp_path / "site.log", env, site=True, extra=secure)
    processes.append(site)
    site_receipts = SiteReceipts(site_broker.host, site_broker.port).start()
    agents = secure_site_agents(tmp_path, site_url)
    processes.extend(agents)

    def site_updates_applied() -> int:
        return sum(a.startswith("dev") for keys in auditor.commits.values() for a, _ in keys)

    auditor.wait("nine site updates in the root's commits", lambda: site_updates_applied() >= 9, 240)
    site_receipts.wait_for(lambda got: sum(r.status == "accepted" for r in got) >= 9, 120)
    summary = stop_site_and_agents(tmp_path, site, agents)  # a cohort needs three devices: together
    assert auditor.error is None, auditor.error
    with auditor.changed:
        _applied_once(auditor.commits, site_receipts.got)
        assert not auditor.sent, "a device's update crossed to the root"
    assert summary["cohorts_summed"] >= 3 and summary["accepted"] == 0, summary  # no plain update taken


@pytest.mark.parametrize("root_and_site", [3], indirect=True)  # K = 3: one cohort's sum makes a step
def test_a_dp_site_on_nats_keeps_its_devices_ledger_in_the_cluster_through_a_kill(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]], root_and_site: RootAndSite
) -> None:
    """``--dp-epsilon`` at a secure NATS site: its devices (which require distributed DP) noise
    before masking, and each sum's contributors are charged in the site's ledger in the cluster
    (bucket ``ledgers``, key ``--site-id``) before the sum leaves. With ``--max-participation 1``
    a site killed (SIGKILL) and started again reads the ledger back and refuses the devices it
    charged: no device is in two sums, though all four are free to form a cohort again for a
    site that forgot them."""
    urls, auditor, site_broker = root_and_site.urls, root_and_site.auditor, root_and_site.site_broker
    site_url = f"mqtt://{site_broker.host}:{site_broker.port}"
    ddp = (
        "--secure-aggregation", "--cohort-size", "3", "--overselect", "0.34", "--dp-epsilon", "8",
        "--max-participation", "1", "--site-id", "hospital-a",
    )  # fmt: skip

    def start_site(log: str) -> tuple[subprocess.Popen[bytes], StderrTap]:
        proc = shard(urls, site_url, tmp_path / log, ROOT_ENV, site=True, extra=ddp, tap=True)
        processes.append(proc)
        return proc, StderrTap(proc, tmp_path / log)

    site, tap = start_site("site.log")
    agents = secure_site_agents(tmp_path, site_url, "--require-distributed-dp")
    processes.extend(agents)

    def applied() -> dict[str, int]:
        """Per site device: the root's versions that hold an update of its."""
        with auditor.changed:
            keys = [a for keys in auditor.commits.values() for a, _ in keys if a.startswith("dev")]
        return {a: keys.count(a) for a in set(keys)}

    auditor.wait("a cohort's sum in the root's commits", lambda: sum(applied().values()) >= 3, 240)
    tap.wait_for("distributed dp: each sum of >= 3 uploads", 10)
    contributors = applied()
    assert set(contributors.values()) == {1}, contributors
    stored = asyncio.run(_site_ledger(urls, "hospital-a"))  # written before the sum left: there now
    assert {a: stored.count(a) for a in stored.releases} == contributors

    site.send_signal(signal.SIGKILL)
    site.wait(30)
    site, tap = start_site("site2.log")
    tap.wait_for(f"privacy ledger of 'hospital-a' read: {len(contributors)} devices", 120)
    for agent in contributors:  # they go on checking in: refused, by the ledger the restart read
        tap.wait_for(f"{agent} joins no more cohorts", 120)
    summary = stop_site_and_agents(tmp_path, site, agents)  # capped devices go on checking in
    assert max(applied().values()) == 1, applied()  # the cap held across the restart
    assert summary["max_epsilon"] == pytest.approx(stored.max_epsilon) and 0 < summary["max_epsilon"] <= 8.0 + 1e-6
    assert summary["secagg_refused"].get("participation_cap", 0) >= len(contributors), summary
    assert auditor.error is None, auditor.error
    assert not auditor.sent, "a device's update crossed to the root"


async def _site_ledger(urls: str, site_id: str) -> Any:
    """The privacy ledger a site keeps in the cluster, read as the site reads it."""
    import nats

    from aggregator.cluster import names
    from aggregator.privacy import FederationLedger
    from fedmq.codec import unpack

    nc = await nats.connect(urls.split(","))
    try:
        kv = await nc.jetstream().key_value(names(PREFIX)["ledgers"])
        ledger = FederationLedger(1e-5)
        ledger.load_state_dict(unpack((await kv.get(site_id)).value or b""))
        return ledger
    finally:
        await nc.close()


async def test_two_processes_of_one_dp_site_cannot_both_write_its_ledger(tmp_path: Path) -> None:
    """The ledger is written by compare-and-set: a second process serving the same site id fails
    with :class:`LedgerConflict` before its sum leaves, instead of overwriting the first one's
    charges; a write of its own whose answer was lost (the same bytes are there) counts as done."""
    import nats

    from aggregator.sharding import Partial
    from aggregator.site import LedgerConflict, SiteAggregator
    from fedmq.codec import pack
    from fedmq.config import AggregatorConfig, BrokerConfig, Config, SecAggConfig, ShardConfig, UplinkConfig

    if not (shutil.which("nats-server") or Path("/usr/sbin/nats-server").exists()):
        pytest.skip("nats-server is not installed (apt-get install nats-server)")
    node_cluster = NatsCluster(1, workdir=tmp_path / "nats").start(timeout=120)
    try:
        node = node_cluster.nodes[0]
        url = f"nats://{node.host}:{node.client_port}"
        agg = AggregatorConfig(
            shard=ShardConfig(nats=url, site=True, replicas=1),
            uplink=UplinkConfig(site_id="hospital-a"),
            secure_aggregation=True,
            secagg=SecAggConfig(dp_epsilon=8.0),
            max_participation=2,
        )
        config = Config(prefix=PREFIX, broker=BrokerConfig(port=1), aggregator=agg).validate()
        sites = [SiteAggregator(config), SiteAggregator(config)]
        for site in sites:
            site._nc = await nats.connect([url])
            site._js = site._nc.jetstream()
            await site._load_ledger()  # both read "no ledger yet"
        try:
            first, second = sites
            assert first.ledger is not None
            first.ledger.record(["dev0"], ("gaussian", 1.0), 1)
            body = pack(first.ledger.state_dict())
            revision = await first._write_ledger(body)  # (its caller keeps the revision; this one does not)
            assert revision > 0
            assert await first._write_ledger(body) == revision  # as if its answer was lost: the same bytes, done
            with pytest.raises(LedgerConflict, match="another process wrote the privacy ledger of site 'hospital-a'"):
                await second._write_ledger(pack({"delta": 1e-5, "releases": {}, "last": {}}))
            stored = await (await first._js.key_value(first.names["ledgers"])).get("hospital-a")
            assert stored.value == body  # the first one's charges stand
            # A cohort summed while a write is in flight: its charge is not in that write's bytes,
            # so its own offer must write again (the ledger stays unsaved).
            first._ledger_revision = revision
            write = first._write_ledger

            async def charged_meanwhile(data: bytes) -> int:
                assert first.ledger is not None
                first.ledger.record(["dev1"], ("gaussian", 1.0), 2)
                first._unsaved = True  # as SiteAggregator._carry marks it for the new sum's Offer
                return await write(data)

            first._write_ledger = charged_meanwhile  # type: ignore[method-assign]
            first._unsaved = True
            await first._before_offer(Partial(first.site_id, 1, 0, (), 0.0, {}))
            assert first._unsaved, "the charge made during the write was marked saved"
        finally:
            for site in sites:
                await site._nc.close()
    finally:
        node_cluster.cleanup()
