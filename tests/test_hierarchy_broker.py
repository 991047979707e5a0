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
from pathlib import Path

import aiomqtt
import numpy as np
import pytest

from broker.launcher import MosquittoBroker
from fedmq.messages import ReceiptMessage, UpdateMessage
from models.datasets import digits

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
                self.changed.wait(left)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(30)


def fedmq(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "cli", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=log.open("ab")
    )


def site_process(root: MosquittoBroker, site: MosquittoBroker, folder: Path, log: Path) -> subprocess.Popen[bytes]:
    return fedmq(
        [
            "aggregator", "--root", f"mqtt://{root.host}:{root.port}", "--site-id", SITE, "--uplink-dir",
            str(folder), "--broker", f"mqtt://{site.host}:{site.port}", "--prefix", PREFIX,
            "--partial-size", "2", "--max-staleness", "1000", "--log-level", "INFO",
        ],
        log,
    )  # fmt: skip


def test_a_site_under_a_root_aggregator_forwards_sums_applied_exactly_once_through_a_kill(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    root_broker = MosquittoBroker().start()
    site_broker = MosquittoBroker().start()
    try:
        root_tap = Tap(root_broker.host, root_broker.port, "root").start()
        site_tap = Tap(site_broker.host, site_broker.port, "site").start()
        root = fedmq(
            [
                "aggregator", "--broker", f"mqtt://{root_broker.host}:{root_broker.port}", "--prefix", PREFIX,
                "--sites", SITE, "--buffer-size", "4", "--max-staleness", "1000", "--checkpoint-dir",
                str(tmp_path / "root-state"), "--http", "", "--eval-data", "builtin:digits-test",
            ],
            tmp_path / "root.log",
        )  # fmt: skip
        processes.append(root)
        site = site_process(root_broker, site_broker, tmp_path / "uplink", tmp_path / "site.log")
        processes.append(site)

        train, _ = digits()
        agents = []
        for i, broker in enumerate((site_broker, site_broker, root_broker)):
            data = tmp_path / f"dev{i}.npz"
            part = train.subset(np.arange(i, 900, 3))
            np.savez(data, x=part.x, y=part.y)
            cmd = [
                "agent", "--broker", f"mqtt://{broker.host}:{broker.port}", "--prefix", PREFIX,
                "--id", f"dev{i}", "--data", str(data), "--no-dp", "--max-updates", "24",
                "--round-interval", "0.3", "--lr", "0.3", "--receipt-timeout", "4",
            ]  # fmt: skip
            agents.append(fedmq(cmd, tmp_path / f"dev{i}.log"))
        processes.extend(agents)

        def accepted_sums(tap: Tap) -> int:
            return sum(r.agent_id == SITE and r.status == "accepted" for r in tap.receipts)

        root_tap.wait_for("three of the site's sums accepted", lambda t: accepted_sums(t) >= 3, 180)
        # The root stops answering (SIGSTOP), so the site's next sum is on its way when the site
        # dies: the restarted site must send that sum again, not a new sum of its updates.
        root.send_signal(signal.SIGSTOP)
        answered = max(r.seq for r in root_tap.receipts if r.agent_id == SITE)
        root_tap.wait_for("a sum sent and not answered", lambda t: any(u.seq > answered for u in t.updates), 120)
        site.send_signal(signal.SIGKILL)
        site.wait(30)
        root.send_signal(signal.SIGCONT)
        before = accepted_sums(root_tap)
        site = site_process(root_broker, site_broker, tmp_path / "uplink", tmp_path / "site2.log")
        processes.append(site)
        root_tap.wait_for("sums after the restart", lambda t: accepted_sums(t) >= before + 3, 180)

        for i, a in enumerate(agents):
            a.communicate(timeout=300)
            assert a.returncode == 0, (tmp_path / f"dev{i}.log").read_text()[-3000:]
        summaries = []
        for p in (site, root):  # SIGTERM: each flushes and prints its summary
            p.send_signal(signal.SIGTERM)
            out, _ = p.communicate(timeout=120)
            summaries.append(json.loads(out.decode().strip().splitlines()[-1]))
        site_summary, summary = summaries
    finally:
        site_broker.cleanup()
        root_broker.cleanup()

    site_log = (tmp_path / "site.log").read_text() + (tmp_path / "site2.log").read_text()
    assert {u.agent_id for u in root_tap.updates} == {SITE, "dev2"}, "a site device's update crossed to the root"
    sums: dict[int, UpdateMessage] = {}
    for u in root_tap.updates:
        if u.agent_id == SITE:  # a seq sent again must be the same sum: one seq names one sum
            first = sums.setdefault(u.seq, u)
            assert u.is_sum and (u.weight, u.contributions) == (first.weight, first.contributions), u.seq
            assert all(np.array_equal(u.delta[k], first.delta[k]) for k in first.delta), f"sum {u.seq} changed"
    root_versions: dict[int, int] = {}
    for r in root_tap.receipts:
        if r.agent_id == SITE and r.status == "accepted":
            assert root_versions.setdefault(r.seq, r.version) == r.version, f"sum {r.seq} got two versions"
    held = Counter[int]()
    for seq, version in root_versions.items():
        held[version] += sums[seq].contributions or 0
    receipted: dict[tuple[str, int], int] = {}
    for r in site_tap.receipts:
        if r.status == "accepted":
            key = (r.agent_id, r.seq)
            assert receipted.setdefault(key, r.version) == r.version, f"{key} receipted with two versions"
    per_version = Counter(receipted.values())
    assert per_version == held, f"device receipts per root version {per_version} != sums' updates {held}\n{site_log}"
    assert {a for a, _ in receipted} == {"dev0", "dev1"}
    assert summary["site_updates"] == sum(held.values()) == len(receipted)
    assert summary["updates_rejected"] == 0, summary["rejected_by_reason"]
    assert summary["model_versions"] >= 6
    assert site_summary["pending"] == 0, site_summary
    assert site_summary["sums_accepted"] >= 3, site_summary
    assert site_summary["sums_resent"] >= 1, site_summary  # the sum in flight at the kill
    assert not site_summary["sums_condemned"] and not site_summary["sums_refused"], site_summary
