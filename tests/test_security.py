"""Tier 3: a real Mosquitto on the configuration that ``fedmq broker init`` generates.

TLS with client certificates, the certificate's CN as username and client id, a
per-identity ACL, a CRL reloaded on SIGHUP, and a password-protected loopback ops listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import pytest

from aggregator.service import AggregatorService
from broker.launcher import MosquittoBroker, free_port
from broker.pki import init, load_registry, revoke
from edge_agent.service import AgentService
from edge_agent.trainer import LocalTrainer
from fedmq.config import AgentConfig, AggregatorConfig, BrokerConfig, Config, PrivacyConfig
from fedmq.errors import ConfigError
from fedmq.messages import ModelMessage, StatusMessage, UpdateMessage
from models.datasets import digits
from runtime.transport import client_kwargs
from tests.helpers import payload, start_aggregator, tls_deployment, wait_until

pytestmark = pytest.mark.broker
PREFIX = "fedmq/secure"
ROOT = Path(__file__).resolve().parents[1]
AGENTS = ["agent-1", "agent-2", "agent-3", "agent-4"]


@dataclass
class Deployment:
    root: Path
    broker: MosquittoBroker

    def broker_config(self, identity: str | None, *, ca: Path | None = None) -> BrokerConfig:
        """TLS settings of ``identity`` (None: no client certificate)."""
        client = self.root / "clients" / (identity or "agent-1")
        return BrokerConfig(
            host="127.0.0.1",
            port=self.broker.port,
            tls=True,
            ca_file=str(ca or client / "ca.crt"),
            cert_file=str(client / "client.crt") if identity else None,
            key_file=str(client / "client.key") if identity else None,
        )

    def client(self, identity: str | None, **kw: Any) -> aiomqtt.Client:
        return aiomqtt.Client(**(client_kwargs(self.broker_config(identity)) | kw))

    def ops_client(self, password: str | None = None) -> aiomqtt.Client:
        """A client on the loopback ops listener (read-only monitoring)."""
        reg = load_registry(self.root)
        assert reg is not None
        if password is None:
            password = (self.root / "broker" / "ops.password").read_text().strip()
        return aiomqtt.Client("127.0.0.1", reg.ops_port, username="ops", password=password)

    def config(self, identity: str) -> Config:
        agg = AggregatorConfig(rule="fedbuff", buffer_size=2, metrics_interval=0.1)
        return Config(prefix=PREFIX, broker=self.broker_config(identity), aggregator=agg).validate()


@pytest.fixture(scope="module")
def deployment() -> Iterator[Deployment]:
    with tls_deployment(AGENTS, PREFIX) as (root, broker):
        yield Deployment(root, broker)


async def refused(client: aiomqtt.Client) -> str:
    """Connect and return the error; fail if the broker let the client in and serves it."""
    try:
        async with asyncio.timeout(10):
            async with client:
                # TLS 1.3 finishes the client's handshake before the server checks the client
                # certificate, so a refusal can surface on the first round trip instead.
                await client.subscribe(f"{PREFIX}/model", qos=1)
    except (aiomqtt.MqttError, ssl.SSLError, OSError) as exc:
        return str(exc) or type(exc).__name__
    raise AssertionError("the broker accepted the client")


CONNECT = bytes.fromhex("100d00044d5154540402003c000178")  # MQTT 3.1.1 CONNECT, client id "x"


async def connack(broker: BrokerConfig | None, port: int) -> bytes:
    """Send one CONNECT (over TLS when ``broker`` is given) and return what the broker answers.

    A refused TLS handshake or a closed connection answers ``b""``; an accepted one answers
    the 4-byte CONNACK. (aiomqtt notices neither until its connect timeout, so probe raw.)
    """
    ctx = client_kwargs(broker)["tls_context"] if broker is not None else None
    try:
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1" if ctx else None
            )
            try:
                writer.write(CONNECT)
                await writer.drain()
                return await reader.read(4)
            finally:
                writer.close()
    except (ssl.SSLError, ConnectionError):
        return b""


ACCEPTED = bytes.fromhex("20020000")


async def test_clients_without_a_valid_certificate_are_refused(deployment: Deployment, tmp_path: Path) -> None:
    port = deployment.broker.port
    assert await connack(deployment.broker_config("agent-1"), port) == ACCEPTED  # the probe works
    assert await connack(None, port) == b""  # plain MQTT on the TLS port
    assert await connack(deployment.broker_config(None), port) == b""  # TLS without a client certificate
    other = tmp_path / "other"  # a certificate from another CA, with a valid-looking name
    init(other, ["agent-1"], prefix=PREFIX, port=free_port(), ops_port=free_port())
    foreign = BrokerConfig(
        host="127.0.0.1",
        port=port,
        tls=True,
        ca_file=str(deployment.root / "clients" / "agent-1" / "ca.crt"),
        cert_file=str(other / "clients" / "agent-1" / "client.crt"),
        key_file=str(other / "clients" / "agent-1" / "client.key"),
    )
    assert await connack(foreign, port) == b""
    # ... and a client that does not trust the broker's certificate never sends anything.
    untrusting = replace(deployment.broker_config("agent-1"), ca_file=str(other / "clients" / "agent-1" / "ca.crt"))
    assert "CERTIFICATE_VERIFY_FAILED" in await refused(aiomqtt.Client(**client_kwargs(untrusting)))
    # The ops listener wants its password.
    assert "Not authorized" in await refused(deployment.ops_client("wrong"))
    async with deployment.ops_client() as ops:
        await ops.subscribe("$SYS/broker/uptime", qos=0)


def trainer(agent_id: str) -> LocalTrainer:
    train, _ = digits()
    privacy = PrivacyConfig(noise_multiplier=0.5)
    data = train.subset(np.arange(40))
    return LocalTrainer(AgentConfig(agent_id=agent_id), privacy, data, rng=np.random.default_rng(0))


async def test_an_agent_can_only_act_as_itself_and_the_aggregator_sees_only_that(deployment: Deployment) -> None:
    server, stop, task = await start_aggregator(deployment.config("aggregator"))
    assert server.core is not None
    topics = server.topics
    honest_cfg = replace(deployment.config("agent-2"), agent=AgentConfig(agent_id="agent-2", round_interval=0.05))
    honest = AgentService(honest_cfg, trainer("agent-2"))
    honest_task = asyncio.create_task(honest.run(stop))

    zeros = {k: np.zeros_like(v) for k, v in server.core.weights.items()}
    forged = UpdateMessage(agent_id="agent-2", seq=2**62, base_version=0, num_examples=5, delta=zeros)
    fake_model = ModelMessage(version=999, model=server.spec, tensors=zeros)
    # agent-1 tries every topic it must not touch, with the aggregator's client id and username.
    async with deployment.client("agent-1", identifier=server_identifier(server), username="aggregator") as evil:
        # Mosquitto grants the subscriptions but delivers nothing the ACL does not let it read.
        await evil.subscribe(topics.update_wildcard, qos=1)
        await evil.subscribe(topics.receipt("agent-2"), qos=1)
        await evil.subscribe(topics.model, qos=1)  # (the aggregate metrics it may read: not subscribed here)
        await evil.publish(topics.update("agent-2"), forged.to_bytes(), qos=1)
        await evil.publish(topics.model, fake_model.to_bytes(), qos=1, retain=True)
        await evil.publish(topics.server_status, StatusMessage("server", "stopped").to_bytes(), qos=1, retain=True)
        await evil.publish(topics.status("agent-2"), StatusMessage("agent-2", "offline").to_bytes(), qos=1)
        # Its own topic works: one update of its own is the sentinel (Mosquitto keeps order).
        own = UpdateMessage(agent_id="agent-1", seq=1, base_version=0, num_examples=5, delta=zeros)
        await evil.publish(topics.update("agent-1"), own.to_bytes(), qos=1)
        await wait_until(server.pulse, lambda: "agent-1" in server.core.last_seq)  # type: ignore[union-attr]
        await wait_until(server.pulse, lambda: server.core.last_seq.get("agent-2", 0) >= 2)  # type: ignore[union-attr]
        # Mosquitto queues an incoming update to every subscriber before the aggregator can act
        # on it, so once agent-1 holds a model made after agent-2's updates, it would also hold
        # those updates (and agent-2's receipts) had the ACL let it read them.
        target = server.core.version + 1
        await wait_until(server.pulse, lambda: server.core.version >= target)  # type: ignore[union-attr]
        async with asyncio.timeout(10):
            async for msg in evil.messages:
                assert msg.topic.value == topics.model, f"agent-1 could read {msg.topic.value}"
                if ModelMessage.from_bytes(payload(msg)).version >= target:
                    break

    assert server.core.last_seq["agent-2"] < 2**62  # the forged update never arrived
    assert dict(server.core.stats.rejected) == {}  # nothing even reached validation
    assert server.rt.connections == 1  # the aggregator's session was never taken over
    async with deployment.ops_client() as reader:  # what the broker retains is the aggregator's
        await reader.subscribe(topics.model, qos=1)
        await reader.subscribe(topics.server_status, qos=1)
        seen: dict[str, bytes] = {}
        async with asyncio.timeout(10):
            async for msg in reader.messages:
                seen[msg.topic.value] = payload(msg)
                if len(seen) == 2:
                    break
    assert ModelMessage.from_bytes(seen[topics.model]).version != 999
    assert StatusMessage.from_bytes(seen[topics.server_status]).state == "online"
    stop.set()
    await asyncio.gather(task, honest_task)


def server_identifier(server: AggregatorService) -> str:
    return f"fedmq-aggregator-{server.topics.prefix.replace('/', '-')}"


async def test_revoked_agent_is_refused_after_reload(deployment: Deployment) -> None:
    async with deployment.client("agent-4") as before:  # valid until revoked
        await before.subscribe(f"{PREFIX}/model", qos=1)
        revoke(deployment.root, "agent-4")
        deployment.broker.reload()
        # New connections fail the handshake once the broker has re-read the CRL; poll for it.
        revoked = deployment.broker_config("agent-4")
        async with asyncio.timeout(10):
            while await connack(revoked, deployment.broker.port) == ACCEPTED:
                pass  # each probe is a full TLS handshake: the broker re-reads the CRL meanwhile
        assert await connack(revoked, deployment.broker.port) == b""
        assert await connack(deployment.broker_config("agent-3"), deployment.broker.port) == ACCEPTED
        # The connection that was open keeps no permission: on reload Mosquitto re-applies
        # security to connected clients and may drop it; if it has not yet, its update is denied.
        async with deployment.client("aggregator") as listener:
            await listener.subscribe(f"{PREFIX}/update/+", qos=1)
            with contextlib.suppress(aiomqtt.MqttError):
                await before.publish(f"{PREFIX}/update/agent-4", b"from a revoked agent", qos=1)
            async with deployment.client("agent-3") as sentinel:
                await sentinel.publish(f"{PREFIX}/update/agent-3", b"sentinel", qos=1)
            async with asyncio.timeout(10):
                async for msg in listener.messages:
                    assert msg.topic.value == f"{PREFIX}/update/agent-3", "a revoked agent's message was delivered"
                    break
    with pytest.raises(ConfigError, match="revoked"):
        init(deployment.root, ["agent-4"])


def test_agent_refuses_a_certificate_of_another_identity(deployment: Deployment) -> None:
    cfg = replace(deployment.config("agent-1"), agent=AgentConfig(agent_id="agent-2"))
    with pytest.raises(ConfigError, match=r"agent\.agent_id.*belongs to 'agent-1'"):
        AgentService(cfg, trainer("agent-2"))


async def test_fedmq_agent_command_joins_over_tls_with_its_certificate(deployment: Deployment) -> None:
    """The device integrator's path: `fedmq agent --broker mqtts://... --ca-file --cert-file --key-file`."""
    server, stop, task = await start_aggregator(deployment.config("aggregator"))
    client = deployment.root / "clients" / "agent-3"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cli",
            "agent",
            "--broker",
            f"mqtts://127.0.0.1:{deployment.broker.port}",
            "--prefix",
            PREFIX,
            "--id",
            "agent-3",
            "--ca-file",
            str(client / "ca.crt"),
            "--cert-file",
            str(client / "client.crt"),
            "--key-file",
            str(client / "client.key"),
            "--data",
            "builtin:digits-train",
            "--round-interval",
            "0.05",
            "--log-level",
            "WARNING",
        ],
        cwd=ROOT,
    )
    try:
        assert server.core is not None
        await wait_until(server.pulse, lambda: server.core.last_seq.get("agent-3", 0) > 0, limit=60)  # type: ignore[union-attr]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0
        stop.set()
        await task
    assert dict(server.core.stats.rejected) == {}


async def test_the_ops_listener_cannot_take_over_the_aggregators_session(deployment: Deployment) -> None:
    """An `ops` login that asks for the aggregator's client id must not disconnect it (or, with a
    clean session, discard the updates queued for it)."""
    server, stop, task = await start_aggregator(deployment.config("aggregator"))
    assert server.core is not None
    password = (deployment.root / "broker" / "ops.password").read_text().strip()
    reg = load_registry(deployment.root)
    assert reg is not None
    for identifier in ("aggregator", server_identifier(server)):
        async with aiomqtt.Client("127.0.0.1", reg.ops_port, username="ops", password=password, identifier=identifier):
            pass
    # A sentinel update shows the aggregator is still on its first connection when it arrives.
    zeros = {k: np.zeros_like(v) for k, v in server.core.weights.items()}
    async with deployment.client("agent-2") as agent:
        own = UpdateMessage(agent_id="agent-2", seq=7, base_version=0, num_examples=5, delta=zeros)
        await agent.publish(server.topics.update("agent-2"), own.to_bytes(), qos=1)
        await wait_until(server.pulse, lambda: server.core.last_seq.get("agent-2", 0) == 7)  # type: ignore[union-attr]
    assert server.rt.connections == 1
    stop.set()
    await task
