"""Project invariants: compose.yaml is consistent, imports point one way, the deployment broker
config really authenticates and applies the ACL (against a real Mosquitto)."""

from __future__ import annotations

import ast
import asyncio
import importlib
import subprocess
import sys
from pathlib import Path

import aiomqtt
import pytest
import yaml

from broker.launcher import DEPLOY_CONF, MosquittoBroker
from cli.main import COMMANDS, build_parser

ROOT = Path(__file__).resolve().parents[1]
ROLE_PACKAGES = {"edge_agent", "aggregator", "simulator"}


def _imports(package: str) -> set[tuple[str, str]]:
    found = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {(str(path.relative_to(ROOT)), a.name.split(".")[0]) for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add((str(path.relative_to(ROOT)), node.module.split(".")[0]))
    return found


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("fedmq", ROLE_PACKAGES | {"models", "broker", "runtime", "cli"}),
        ("models", ROLE_PACKAGES | {"broker", "runtime", "cli"}),
        ("runtime", ROLE_PACKAGES | {"broker", "models", "cli"}),
        ("broker", ROLE_PACKAGES | {"models", "cli"}),
        ("edge_agent", {"aggregator", "simulator", "cli"}),
        ("aggregator", {"edge_agent", "simulator", "cli"}),
    ],
)
def test_imports_point_one_way(package: str, forbidden: set[str]) -> None:
    bad = sorted((f, m) for f, m in _imports(package) if m in forbidden)
    assert bad == [], f"{package} must not import {forbidden}: {bad}"


def test_agent_runtime_does_not_import_torch_or_the_server_side() -> None:
    """Nor cryptography (10 MiB): it loads for TLS or when an aggregator announces secure aggregation."""
    code = (
        "import sys, edge_agent.service, edge_agent.cli; "
        "bad = [m for m in ('torch', 'sklearn', 'aggregator', 'amqtt', 'matplotlib', 'cryptography') "
        "if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_cli_command_builds_its_parser() -> None:
    for name in COMMANDS:
        parser = build_parser(name)
        assert parser.prog == "fedmq"


def test_compose_runs_the_generated_tls_deployment(tmp_path: Path) -> None:
    """compose.yaml's pki command, run here, yields every file the other services mount."""
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert {"pki", "mosquitto", "aggregator", "agent-1", "agent-2", "agent-3"} <= set(services)
    image = services["mosquitto"]["image"]
    assert image.startswith("eclipse-mosquitto:") and image.split(":")[1][0].isdigit(), "pin the image version"
    assert services["mosquitto"]["ports"] == ["127.0.0.1:8883:8883"]
    assert services["mosquitto"]["depends_on"]["pki"]["condition"] == "service_completed_successfully"

    # Run the pki service's own command against a local folder instead of the volume.
    init_cmd = [tmp_path.as_posix() if a == "/pki" else a for a in services["pki"]["command"]]
    args = build_parser("broker").parse_args(init_cmd)
    assert build_parser("broker").parse_args(services["pki"]["command"]).dir == Path("/pki")
    assert importlib.import_module("broker.cli").run(args) == 0

    def mounts(svc: str) -> dict[str, str]:
        out = {}
        for v in services[svc]["volumes"]:
            if isinstance(v, dict) and v["source"] == "pki":
                assert v["read_only"] is True
                out[v["target"]] = v["volume"]["subpath"]
        return out

    broker_dir = mounts("mosquitto")["/mosquitto/config"]
    conf = (tmp_path / broker_dir / "mosquitto.conf").read_text()
    for line in conf.splitlines():
        words = line.split()
        if words and words[0] in ("password_file", "acl_file", "cafile", "certfile", "keyfile", "crlfile"):
            assert words[1].startswith("/mosquitto/config/"), line
            assert (tmp_path / broker_dir / Path(words[1]).name).is_file(), line
    assert "persistence_location /mosquitto/data/" in conf
    assert any(v == "mosquitto-data:/mosquitto/data" for v in services["mosquitto"]["volumes"])
    assert "ops.password" in services["mosquitto"]["healthcheck"]["test"][1]

    dockerfile = (ROOT / "Dockerfile").read_text()
    for pkg in ("fedmq", "broker", "edge_agent", "aggregator", "models", "simulator"):
        assert f"COPY {pkg} ./{pkg}" in dockerfile
    for svc in ("aggregator", "agent-1", "agent-2", "agent-3"):
        s = services[svc]
        assert s["build"] == "." and s["command"][0] in COMMANDS
        parsed = build_parser(s["command"][0]).parse_args(s["command"])
        assert parsed.broker.startswith("mqtts://mosquitto:")
        identity = "aggregator" if svc == "aggregator" else vars(parsed)["cfg:agent.agent_id"]
        assert identity == svc
        certs = tmp_path / mounts(svc)["/certs"]
        assert certs == tmp_path / "clients" / identity
        for flag_name, file in (("ca_file", "ca.crt"), ("cert_file", "client.crt"), ("key_file", "client.key")):
            assert getattr(parsed, flag_name) == f"/certs/{file}" and (certs / file).is_file()


def _passwords() -> dict[str, str]:
    users = [line.split(":")[0] for line in (ROOT / "broker/passwd.compose").read_text().splitlines() if line]
    return {u: f"{u}-dev-password" for u in users}


@pytest.mark.broker
async def test_deployment_config_authenticates_and_enforces_the_acl(tmp_path: Path) -> None:
    broker = MosquittoBroker(workdir=tmp_path, conf=DEPLOY_CONF)
    await asyncio.to_thread(broker.start)
    pw = _passwords()
    h, p = broker.host, broker.port
    try:
        with pytest.raises(aiomqtt.MqttError):
            async with aiomqtt.Client(h, p):
                pass
        with pytest.raises(aiomqtt.MqttError):
            async with aiomqtt.Client(h, p, username="agent-1", password="wrong"):
                pass
        async with aiomqtt.Client(h, p, username="aggregator", password=pw["aggregator"]) as agg:
            await agg.subscribe("fedmq/acl/update/+", qos=1)
            async with aiomqtt.Client(h, p, username="agent-1", password=pw["agent-1"]) as a1:
                await a1.publish("fedmq/acl/update/agent-2", b"forged", qos=1)  # denied by the ACL
                await a1.publish("fedmq/acl/model", b"forged-model", qos=1, retain=True)  # denied
                await a1.publish("fedmq/acl/update/agent-1", b"mine", qos=1)
            async with asyncio.timeout(10):
                async for msg in agg.messages:
                    assert msg.topic.value == "fedmq/acl/update/agent-1" and msg.payload == b"mine"
                    break
        # Nothing forged was retained on the model topic. Retained messages are sent right after
        # SUBACK, before anything published later, so a sentinel published after subscribing
        # arriving first proves there was none.
        async with aiomqtt.Client(h, p, username="aggregator", password=pw["aggregator"]) as agg2:
            await agg2.subscribe("fedmq/acl/model", qos=1)
            await agg2.subscribe("fedmq/acl/metrics", qos=1)
            await agg2.publish("fedmq/acl/metrics", b"sentinel", qos=1)
            async with asyncio.timeout(10):
                async for msg in agg2.messages:
                    assert msg.payload == b"sentinel", f"unexpected {msg.topic.value}: {msg.payload!r}"
                    break
            await agg2.publish("fedmq/acl/model", b"real-model", qos=1, retain=True)
        assert await _retained(h, p, "fedmq/acl/model", "agent-2", pw["agent-2"]) == b"real-model"
    finally:
        await asyncio.to_thread(broker.cleanup)


async def _retained(host: str, port: int, topic: str, user: str, password: str) -> bytes:
    async with aiomqtt.Client(host, port, username=user, password=password) as c:
        await c.subscribe(topic, qos=1)
        async with asyncio.timeout(10):
            async for msg in c.messages:
                assert isinstance(msg.payload, bytes)
                return msg.payload
    raise AssertionError("unreachable")


def test_auto_broker_falls_back_to_embedded_when_mosquitto_fails(tmp_path: Path) -> None:
    from broker.launcher import start_broker

    bad = tmp_path / "bad.conf"
    bad.write_text("listener 1883 127.0.0.1\nthis_is_not_a_directive 1\n")
    b = start_broker("auto", conf=bad)
    try:
        assert b.kind == "embedded"
    finally:
        b.stop()


def test_the_readme_configuration_example_loads_and_validates(tmp_path: Path) -> None:
    """The TOML in README's Configuration section is a real config: every key exists and is valid."""
    from fedmq.config import load_config

    text = (ROOT / "README.md").read_text()
    block = text.split("## Configuration", 1)[1].split("```toml", 1)[1].split("```", 1)[0]
    path = tmp_path / "fedmq.toml"
    path.write_text(block)
    cfg = load_config(path, env={})
    assert cfg.agent.compression == "none" and cfg.aggregator.model_interval == 0.0
    assert cfg.aggregator.buffer_size == 10 and cfg.privacy.epsilon_budget == 10.0


def test_the_license_file_is_the_one_pyproject_names() -> None:
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["license"] == {"text": "Apache-2.0"}
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
