"""Hierarchical aggregation on real brokers: a site with its own Mosquitto under a root aggregator.

Two real Mosquitto processes on free loopback ports, the root's and the site's. The root is an
ordinary `fedmq aggregator --sites site-a` with its write-ahead log; the site is `fedmq aggregator
--root ... --site-id site-a`; three real `fedmq agent` processes train, two on the site's broker and
one on the root's. Mid-run the site is killed with SIGKILL and started again on its folder.

The audit, from subscribers on both brokers:
- no site device's update ever crosses to the root's broker; only the site's sums do;
- for every root version, the device updates the site receipted ``accepted`` with that version are
  exactly as many as the site's sums the root accepted at that version hold: an update applied
  twice, or receipted without being applied, breaks the count;
- the site's devices trained on the root's model (the root's version went up with their sums).

The kill is timed to hurt: the root is stopped (SIGSTOP) until a sum is on its way, and
continued after the site died, so the root applies a sum whose sender is gone and the restarted
site must send it again from its folder, not a new sum of the same updates.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import numpy as np
import pytest

from broker.launcher import MosquittoBroker
from fedmq.messages import ReceiptMessage, UpdateMessage
from fedmq.topics import Topics
from models.datasets import digits
from tests.helpers import published_before_subscribing, tracing_mosquitto

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "fedmq/hier"
SITE = "site-a"


class Tap:
    """Every update and receipt on one broker (a subscriber in its own thread and loop)."""

    def __init__(self, host: str, port: int, name: str) -> None:
        self.host, self.port, self.name = host, port, name
        self.updates: list[UpdateMessage] = []
        self.receipts: list[ReceiptMessage] = []
        self.changed = threading.Condition()
        self.ready = threading.Event()
        threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True).start()

    async def _main(self) -> None:
        with contextlib.suppress(aiomqtt.MqttError):  # the broker stops at the end of the test
            async with aiomqtt.Client(self.host, self.port, identifier=f"tap-{self.name}") as client:
                await client.subscribe(f"{PREFIX}/update/+", qos=1)
                await client.subscribe(f"{PREFIX}/receipt/+", qos=1)
                self.ready.set()
                async for msg in client.messages:
                    assert isinstance(msg.payload, (bytes, bytearray))
                    body = bytes(msg.payload)
                    with self.changed:
                        if "/update/" in msg.topic.value:
                            self.updates.append(UpdateMessage.from_bytes(body))
                        else:
                            self.receipts.append(ReceiptMessage.from_bytes(body))
                        self.changed.notify_all()

    def start(self) -> Tap:
        assert self.ready.wait(60), f"the {self.name} tap did not subscribe"
        return self

    def wait_for(self, what: str, predicate: Callable[[Tap], bool], limit: float) -> None:
        deadline = time.monotonic() + limit
        with self.changed:
            while not predicate(self):
                left = deadline - time.monotonic()
                assert left > 0, f"{what}: not within {limit} s"
                self.changed.wait(min(left, 0.5))  # (the predicate may also read the other tap)


def fedmq(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "cli", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=log.open("ab")
    )


@dataclass
class Brokers:
    """A root's and a site's Mosquitto, each with a :class:`Tap`."""

    root: MosquittoBroker
    site: MosquittoBroker
    root_tap: Tap
    site_tap: Tap


@pytest.fixture
def brokers(tmp_path: Path) -> Iterator[Brokers]:
    """Two Mosquittos and their taps, stopped at the end, pass or fail."""
    root = MosquittoBroker().start()
    site = tracing_mosquitto(tmp_path / "site-broker")  # its log shows the site subscribed before it relayed
    try:
        yield Brokers(root, site, Tap(root.host, root.port, "root").start(), Tap(site.host, site.port, "site").start())
    finally:
        site.cleanup()
        root.cleanup()


def site_process(
    root: MosquittoBroker, site: MosquittoBroker, folder: Path, log: Path, *, secure: bool, extra: tuple[str, ...] = ()
) -> subprocess.Popen[bytes]:
    secagg = ["--secure-aggregation", "--cohort-size", "3", "--overselect", "0.34", *extra] if secure else []
    return fedmq(
        [
            "aggregator", "--root", f"mqtt://{root.host}:{root.port}", "--site-id", SITE, "--uplink-dir",
            str(folder), "--broker", f"mqtt://{site.host}:{site.port}", "--prefix", PREFIX,
            "--partial-size", "2", "--max-staleness", "1000", "--log-level", "INFO", *secagg,
        ],
        log,
    )  # fmt: skip


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secure-aggregation"])
def test_a_site_under_a_root_aggregator_forwards_sums_applied_exactly_once_through_a_kill(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]], brokers: Brokers, secure: bool
) -> None:
    """With ``secure``, the site serves SecAgg+ cohorts to its four devices (which require it):
    no device update crosses even the site's broker; the site learns only cohorts' sums."""
    root_broker, site_broker, root_tap, site_tap = brokers.root, brokers.site, brokers.root_tap, brokers.site_tap
    root = fedmq(
        [
            "aggregator", "--broker", f"mqtt://{root_broker.host}:{root_broker.port}", "--prefix", PREFIX,
            "--sites", SITE, "--buffer-size", "4", "--max-staleness", "1000", "--checkpoint-dir",
            str(tmp_path / "root-state"), "--http", "127.0.0.1:0", "--eval-data", "builtin:digits-test",
        ],
        tmp_path / "root.log",
    )  # fmt: skip
    processes.append(root)
    site = site_process(root_broker, site_broker, tmp_path / "uplink", tmp_path / "site.log", secure=secure)
    processes.append(site)

    train, _ = digits()
    agents = []
    at_site = 4 if secure else 2
    homes = [site_broker] * at_site + [root_broker]
    direct = f"dev{at_site}"  # the root's own device
    for i, broker in enumerate(homes):
        data = tmp_path / f"dev{i}.npz"
        part = train.subset(np.arange(i, 900, len(homes)))
        np.savez(data, x=part.x, y=part.y)
        cmd = [
            "agent", "--broker", f"mqtt://{broker.host}:{broker.port}", "--prefix", PREFIX,
            "--id", f"dev{i}", "--data", str(data), "--no-dp", "--max-updates", "24",
            "--round-interval", "0.3", "--lr", "0.3", "--receipt-timeout", "4",
        ]  # fmt: skip
        if secure and broker is site_broker:
            cmd += ["--require-secure-aggregation", "--checkin-interval", "0.5"]
        agents.append(fedmq(cmd, tmp_path / f"dev{i}.log"))
    processes.extend(agents)

    def accepted_sums(tap: Tap) -> int:
        return sum(r.agent_id == SITE and r.status == "accepted" for r in tap.receipts)

    root_tap.wait_for("three of the site's sums accepted", lambda t: accepted_sums(t) >= 3, 180)
    # The root stops answering (SIGSTOP), so the site's next sum is on its way when the site
    # dies: the restarted site must send that sum again, not a new sum of its updates.
    root.send_signal(signal.SIGSTOP)
    # Answers the root sent before it stopped may still be on their way to the site; with
    # three sums kept in the site's folder at least one is unanswered for sure.
    kept = tmp_path / "uplink" / "sums"
    root_tap.wait_for("three sums kept unanswered", lambda _: len(list(kept.glob("*.sum"))) >= 3, 120)
    site.send_signal(signal.SIGKILL)
    site.wait(30)
    root.send_signal(signal.SIGCONT)
    before = accepted_sums(root_tap)
    site = site_process(root_broker, site_broker, tmp_path / "uplink", tmp_path / "site2.log", secure=secure)
    processes.append(site)
    root_tap.wait_for("sums after the restart", lambda t: accepted_sums(t) >= before + 3, 180)

    if secure:  # a cohort needs three devices: the last ones could not finish alone, so stop them all
        for a in agents[:at_site]:
            a.send_signal(signal.SIGTERM)
    for i, a in enumerate(agents):
        a.communicate(timeout=300)
        assert a.returncode == 0, (tmp_path / f"dev{i}.log").read_text()[-3000:]
    # Before the site stops: every sum it sent is answered, and the devices' receipts are out.
    root_tap.wait_for("every sum answered", lambda t: answered_all(t), 120)
    site_tap.wait_for("the devices' receipts", lambda t: audit(root_tap, t)[0] == audit(root_tap, t)[1], 120)
    summaries = []
    for p in (site, root):  # SIGTERM: each flushes and prints its summary
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=120)
        summaries.append(json.loads(out.decode().strip().splitlines()[-1]))
    site_summary, summary = summaries

    site_log = (tmp_path / "site.log").read_text() + (tmp_path / "site2.log").read_text()
    topics = Topics(PREFIX)  # both runs of the site listened before they relayed the model
    relayed_early = published_before_subscribing(
        site_broker.log_path, f"fedmq-site-{SITE}-local", topics.update_wildcard, topics.model
    )
    assert relayed_early == [], relayed_early
    assert {u.agent_id for u in root_tap.updates} == {SITE, direct}, "a site device's update crossed to the root"
    if secure:
        assert site_tap.updates == [], "a device sent a plain update to a site that takes only masked ones"
    for u in root_tap.updates:
        if u.agent_id == SITE:  # a seq sent again must be the same sum: one seq names one sum
            first = next(f for f in root_tap.updates if f.agent_id == SITE and f.seq == u.seq)
            assert u.is_sum and (u.weight, u.contributions) == (first.weight, first.contributions), u.seq
            assert all(np.array_equal(u.delta[k], first.delta[k]) for k in first.delta), f"sum {u.seq} changed"
    held, per_version, receipted = audit(root_tap, site_tap)
    assert per_version == held, f"device receipts per root version {per_version} != sums' updates {held}\n{site_log}"
    if secure:  # each cohort leaves one of its four members out; over the run every device is in
        assert len({a for a, _ in receipted}) >= 3, receipted
    else:
        assert {a for a, _ in receipted} == {f"dev{i}" for i in range(at_site)}
    assert summary["site_updates"] == sum(held.values()) == len(receipted)
    assert summary["updates_rejected"] == 0, summary["rejected_by_reason"]
    assert summary["model_versions"] >= 6
    assert site_summary["pending"] == 0, site_summary
    assert site_summary["sums_accepted"] >= 3, site_summary
    assert site_summary["sums_resent"] >= 1, site_summary  # the sum in flight at the kill
    assert not site_summary["sums_condemned"] and not site_summary["sums_refused"], site_summary


def answered_all(root_tap: Tap) -> bool:
    """Every sum the site sent has the root's answer."""
    sent = {u.seq for u in root_tap.updates if u.agent_id == SITE}
    return sent <= {r.seq for r in root_tap.receipts if r.agent_id == SITE and r.status != "retry"}


def audit(root_tap: Tap, site_tap: Tap) -> tuple[Counter[int], Counter[int], dict[tuple[str, int], int]]:
    """Per root version: the device updates in the sums the root accepted, and the devices' accepted receipts.

    Also checks that no sum and no device update was receipted with two versions.
    """
    contributions = {u.seq: u.contributions or 0 for u in list(root_tap.updates) if u.agent_id == SITE}
    root_versions: dict[int, int] = {}
    for r in list(root_tap.receipts):
        if r.agent_id == SITE and r.status == "accepted":
            assert root_versions.setdefault(r.seq, r.version) == r.version, f"sum {r.seq} got two versions"
    held = Counter[int]()
    for seq, version in root_versions.items():
        held[version] += contributions[seq]
    receipted: dict[tuple[str, int], int] = {}
    for r in list(site_tap.receipts):
        if r.status == "accepted":
            key = (r.agent_id, r.seq)
            assert receipted.setdefault(key, r.version) == r.version, f"{key} receipted with two versions"
    return held, Counter(receipted.values()), receipted


def test_a_site_with_distributed_dp_sends_the_root_only_noised_sums_and_caps_its_devices(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]], brokers: Brokers
) -> None:
    """``--dp-epsilon`` at a secure site: its devices (which require distributed DP) add their
    noise before masking, the site forwards each noised sum over its number of uploads
    (``weight == contributions``), keeps their ledger and refuses a device's third sum
    (``--max-participation 2``); its summary reports the devices' largest epsilon."""
    root_broker, site_broker, root_tap, site_tap = brokers.root, brokers.site, brokers.root_tap, brokers.site_tap
    root = fedmq(
        [
            "aggregator", "--broker", f"mqtt://{root_broker.host}:{root_broker.port}", "--prefix", PREFIX,
            "--sites", SITE, "--buffer-size", "3", "--max-staleness", "1000",
        ],
        tmp_path / "root.log",
    )  # fmt: skip
    processes.append(root)
    ddp = ("--dp-epsilon", "8", "--max-participation", "2")
    site = site_process(root_broker, site_broker, tmp_path / "uplink", tmp_path / "site.log", secure=True, extra=ddp)
    processes.append(site)
    train, _ = digits()
    agents = []
    for i in range(4):
        data = tmp_path / f"dev{i}.npz"
        part = train.subset(np.arange(i, 900, 4))
        np.savez(data, x=part.x, y=part.y)
        cmd = [
            "agent", "--broker", f"mqtt://{site_broker.host}:{site_broker.port}", "--prefix", PREFIX,
            "--id", f"dev{i}", "--data", str(data), "--no-dp", "--max-updates", "24", "--round-interval", "0.3",
            "--lr", "0.3", "--receipt-timeout", "4", "--require-secure-aggregation", "--require-distributed-dp",
            "--checkin-interval", "0.5",
        ]  # fmt: skip
        agents.append(fedmq(cmd, tmp_path / f"dev{i}.log"))
    processes.extend(agents)

    def accepted_sums(tap: Tap) -> int:
        return sum(r.agent_id == SITE and r.status == "accepted" for r in tap.receipts)

    root_tap.wait_for("two of the site's sums accepted", lambda t: accepted_sums(t) >= 2, 240)
    site_tap.wait_for("the devices' receipts", lambda t: sum(r.status == "accepted" for r in t.receipts) >= 6, 120)
    for a in agents:  # capped devices go on checking in: stop them
        a.send_signal(signal.SIGTERM)
    for i, a in enumerate(agents):
        a.communicate(timeout=120)
        assert a.returncode == 0, (tmp_path / f"dev{i}.log").read_text()[-3000:]
    root_tap.wait_for("every sum answered", lambda t: answered_all(t), 120)
    site.send_signal(signal.SIGTERM)
    out, _ = site.communicate(timeout=120)
    site_summary = json.loads(out.decode().strip().splitlines()[-1])

    site_log = (tmp_path / "site.log").read_text()
    assert "distributed DP: each sum of >= 3 uploads" in site_log, site_log[-3000:]
    sums = [u for u in root_tap.updates if u.agent_id == SITE]
    assert sums and all(u.weight == float(u.contributions or 0) for u in sums), [
        (u.weight, u.contributions) for u in sums
    ]
    assert {u.agent_id for u in root_tap.updates} == {SITE}
    assert site_tap.updates == []
    per_device = Counter(r.agent_id for r in site_tap.receipts if r.status == "accepted")
    assert per_device and max(per_device.values()) <= 2, per_device  # the cap, over every sum that left
    assert 0 < site_summary["max_epsilon"] <= 8.0 + 1e-6, site_summary
