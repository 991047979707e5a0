"""fedmq on a 3-node loopback NATS cluster (MQTT and JetStream on every node), started by broker.nats.

Real nats-server processes, not mocks. Devices and the aggregator connect to different nodes.
The tests check three things: a retained model written on one node reaches a device on
another; it survives a kill -9 of the node it was written on; and a federation trains across
the nodes. Every wait is on a message, a pulse or the nodes' health endpoint, with generous
limits: JetStream elects a new leader after a kill.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import aiomqtt
import numpy as np
import pytest

from aggregator.service import AggregatorService
from broker.nats import NatsCluster
from edge_agent.service import AgentService
from edge_agent.trainer import LocalTrainer
from fedmq.config import AgentConfig, AggregatorConfig, BrokerConfig, Config, PrivacyConfig
from fedmq.messages import ModelMessage
from models.datasets import digits
from tests.helpers import wait_until

pytestmark = pytest.mark.cluster


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    if not (shutil.which("nats-server") or Path("/usr/sbin/nats-server").exists()):
        if os.environ.get("FEDMQ_REQUIRE_ALL") == "1":
            pytest.fail("nats-server is not installed (apt-get install nats-server); .ci/run installs it")
        pytest.skip("nats-server is not installed (apt-get install nats-server)")
    c = NatsCluster(3, workdir=tmp_path / "nats").start(timeout=120)
    try:
        yield c
    finally:
        c.cleanup()


async def _retained(host: str, port: int, topic: str, *, identifier: str, limit: float) -> bytes | None:
    """The retained message on ``topic`` as a new client of that node sees it, or None within ``limit``."""
    try:
        async with aiomqtt.Client(host, port, identifier=identifier) as client:
            await client.subscribe(topic, qos=1)
            async with asyncio.timeout(limit):
                async for msg in client.messages:
                    assert isinstance(msg.payload, (bytes, bytearray))
                    return bytes(msg.payload)
    except (TimeoutError, aiomqtt.MqttError):
        return None
    return None


async def _retained_eventually(
    host: str, port: int, topic: str, *, identifier: str, asks: int, limit: float
) -> bytes | None:
    """Ask again, as a new client each time, until the node has the retained message (or ``asks`` run out).

    A node's retained messages are eventually consistent: a SUBSCRIBE that reaches it before the
    model written on another node gets nothing, and nothing later (in one fresh-clone CI run the
    first read waited 60 s in vain). Agents ask again too (``agent.model_wait``).
    """
    for attempt in range(asks):
        got = await _retained(host, port, topic, identifier=f"{identifier}-{attempt}", limit=limit)
        if got is not None:
            return got
    return None


def test_a_retained_model_written_on_one_node_reaches_others_and_survives_its_node(cluster: NatsCluster) -> None:
    """Each phase is bounded on its own (a sync test: JetStream's failover may take tens of seconds)."""
    n1, n2, n3 = cluster.nodes
    model = os.urandom(4 * 1024 * 1024)  # a 1M-parameter float32 model: above NATS' default 1 MB payload

    async def publish() -> None:
        async with aiomqtt.Client(n1.host, n1.mqtt_port, identifier="aggregator") as server:
            await server.publish("fedmq/c/model", model, qos=1, retain=True)

    asyncio.run(asyncio.wait_for(publish(), 60))
    got = _retained_eventually(n3.host, n3.mqtt_port, "fedmq/c/model", identifier="dev-3", asks=12, limit=10)
    assert asyncio.run(got) == model

    cluster.kill(0)  # kill -9 the node the model was written on

    # JetStream elects new leaders for the MQTT streams (about 10 s here); a device connecting
    # now, to another node, must still get the model. Ask again until it does.
    got = _retained_eventually(n2.host, n2.mqtt_port, "fedmq/c/model", identifier="dev-2", asks=30, limit=10)
    assert asyncio.run(got) == model

    cluster.restart(0, timeout=120)  # the node comes back, catches up, and serves the model too
    got = _retained_eventually(n1.host, n1.mqtt_port, "fedmq/c/model", identifier="dev-1", asks=12, limit=10)
    assert asyncio.run(got) == model


async def test_a_federation_trains_with_its_devices_on_different_nodes(cluster: NatsCluster) -> None:
    n1, n2, n3 = cluster.nodes
    train, test = digits()
    agg = AggregatorConfig(rule="fedbuff", buffer_size=2, rate_limit=0, metrics_interval=0.5)
    base = Config(prefix="fedmq/cluster", broker=BrokerConfig(host=n1.host, port=n1.mqtt_port), aggregator=agg)
    server = AggregatorService(base.validate(), eval_data=test)
    stop = asyncio.Event()
    task = asyncio.create_task(server.run(stop))
    await asyncio.wait_for(server.ready.wait(), 60)
    runs = []
    updates_each = 4
    for i, node in enumerate((n2, n3)):
        acfg = AgentConfig(agent_id=f"dev-{i}", round_interval=0.1, max_updates=updates_each, lr=0.3)
        cfg = replace(base, broker=BrokerConfig(host=node.host, port=node.mqtt_port), agent=acfg)
        trainer = LocalTrainer(acfg, PrivacyConfig(enabled=False), train.subset(np.arange(i, 600, 2)),
                               rng=np.random.default_rng(i))  # fmt: skip
        runs.append(asyncio.create_task(AgentService(cfg, trainer).run()))
    try:
        stats = await asyncio.wait_for(asyncio.gather(*runs), 120)
        core = server.core
        assert core is not None
        await wait_until(server.pulse, lambda: core.stats.accepted == 2 * updates_each, 60)
        assert core.version >= updates_each - 1 and sum(core.stats.rejected.values()) == 0
        assert all(s.receipts_accepted == updates_each for s in stats)  # receipts crossed the nodes too
        # The newest model is retained in JetStream: a device on the third node gets it at once.
        async with aiomqtt.Client(n3.host, n3.mqtt_port, identifier="late") as late:
            await late.subscribe(base.topics.model, qos=1)
            async with asyncio.timeout(60):
                async for msg in late.messages:
                    assert isinstance(msg.payload, (bytes, bytearray))
                    if ModelMessage.from_bytes(bytes(msg.payload)).version == core.version:
                        break
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


def test_fedmq_cluster_starts_three_nodes_and_stops_them_at_sigterm(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    if not (shutil.which("nats-server") or Path("/usr/sbin/nats-server").exists()):
        pytest.skip("nats-server is not installed")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-m", "cli", "cluster", "--nodes", "3"], cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    assert proc.stdout is not None
    urls = []
    try:
        for line in proc.stdout:  # readiness: the command prints each node once the cluster is healthy
            if line.strip().startswith("n") and "mqtt://" in line:
                urls.append(line.split()[1])
            if "configs and logs" in line:
                break
        assert len(urls) == 3, urls

        async def roundtrip() -> bytes | None:
            host, port = urls[0].removeprefix("mqtt://").split(":")
            async with aiomqtt.Client(host, int(port), identifier="a") as a:
                await a.publish("fedmq/cli/model", b"hello", qos=1, retain=True)
            host, port = urls[2].removeprefix("mqtt://").split(":")
            return await _retained(host, int(port), "fedmq/cli/model", identifier="b", limit=60)

        assert asyncio.run(roundtrip()) == b"hello"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0


async def test_device_permissions_on_nats_match_the_mosquitto_acl(tmp_path: Path) -> None:
    """broker.nats.authorization: a device reads the model and its own receipts, publishes only its
    own update; another device's update is dropped and another's receipts are refused."""
    if not (shutil.which("nats-server") or Path("/usr/sbin/nats-server").exists()):
        pytest.skip("nats-server is not installed (apt-get install nats-server)")
    from broker.nats import authorization

    block = authorization("fedmq/acl", {"dev1": "pw-1"}, {"aggregator": "pw-a"})
    node = NatsCluster(1, workdir=tmp_path / "nats", authorization=block).start(timeout=120)
    try:
        host, port = node.nodes[0].host, node.nodes[0].mqtt_port
        async with aiomqtt.Client(host, port, username="aggregator", password="pw-a", identifier="agg") as agg:
            await agg.publish("fedmq/acl/model", b"model", qos=1, retain=True)
            await agg.subscribe("fedmq/acl/update/+", qos=1)
            async with aiomqtt.Client(host, port, username="dev1", password="pw-1", identifier="dev1") as dev:
                await dev.subscribe("fedmq/acl/model", qos=1)
                async with asyncio.timeout(60):
                    async for msg in dev.messages:
                        assert msg.payload == b"model" and msg.retain
                        break
                await dev.publish("fedmq/acl/update/dev2", b"spoofed", qos=1)  # dropped by the server
                await dev.publish("fedmq/acl/update/dev1", b"own", qos=1)
                refused = await dev.subscribe("fedmq/acl/receipt/dev2", qos=1)
                assert refused[0].is_failure  # type: ignore[index, union-attr]
                refused = await dev.subscribe("$MQTT/sub/#", qos=1)
                assert refused[0].is_failure  # type: ignore[index, union-attr]
            async with asyncio.timeout(60):
                async for msg in agg.messages:  # the spoofed one never arrives: the first is its own
                    assert (msg.topic.value, msg.payload) == ("fedmq/acl/update/dev1", b"own")
                    break
        with pytest.raises(aiomqtt.MqttError):  # no password, no connection
            async with aiomqtt.Client(host, port, username="dev1", password="wrong", identifier="x"):
                pass
    finally:
        node.cleanup()
