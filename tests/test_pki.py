"""Tier 1: what ``fedmq broker init`` and ``revoke`` write, checked without a broker."""

from __future__ import annotations

import base64
import shutil
import ssl
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509

from broker.pki import (
    certificate_common_name,
    init,
    load_registry,
    mosquitto_password_hash,
    parse_agents,
    render_acl,
    revoke,
)
from fedmq.config import load_config
from fedmq.errors import ConfigError
from runtime.transport import client_kwargs


def cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_init_issues_a_chain_per_identity_with_private_keys_kept_private(tmp_path: Path) -> None:
    report = init(tmp_path, ["agent-1", "agent-2"], hostnames=["broker", "localhost"], group=None)
    assert report.created == ("broker", "aggregator", "agent-1", "agent-2")
    ca = cert(tmp_path / "ca" / "ca.crt")
    for name in ("aggregator", "agent-1", "agent-2"):
        c = cert(tmp_path / "clients" / name / "client.crt")
        c.verify_directly_issued_by(ca)
        assert certificate_common_name(tmp_path / "clients" / name / "client.crt") == name
        eku = c.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH in eku
        assert stat.S_IMODE((tmp_path / "clients" / name / "client.key").stat().st_mode) == 0o600
    server = cert(tmp_path / "broker" / "server.crt")
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"broker", "localhost"}
    assert stat.S_IMODE((tmp_path / "ca" / "ca.key").stat().st_mode) == 0o600
    conf = (tmp_path / "broker" / "mosquitto.conf").read_text().splitlines()
    for line in (
        "allow_anonymous false",
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
        "tls_version tlsv1.2",
        f"crlfile {tmp_path.resolve()}/broker/crl.pem",
    ):
        assert line in conf


def test_rerunning_init_adds_agents_and_keeps_every_existing_key(tmp_path: Path) -> None:
    init(tmp_path, ["agent-1"], group=None)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*.key")} | {p: p.read_bytes() for p in tmp_path.rglob("*.crt")}
    report = init(tmp_path, ["agent-1", "agent-2"], group=None)
    assert report.created == ("agent-2",) and set(report.kept) == {"broker", "aggregator", "agent-1"}
    for path, data in before.items():
        assert path.read_bytes() == data, path
    assert "user agent-2" in (tmp_path / "broker" / "acl").read_text()


def test_acl_grants_each_agent_exactly_its_topics(tmp_path: Path) -> None:
    init(tmp_path, ["agent-1"], prefix="fedmq/plant", group=None)
    reg = load_registry(tmp_path)
    assert reg is not None
    acl = render_acl(reg)
    block = acl.split("user agent-1\n")[1].split("\n\n")[0].splitlines()
    assert block == [
        "topic read fedmq/plant/model",
        "topic read fedmq/plant/metrics",
        "topic read fedmq/plant/server/status",
        "topic read fedmq/plant/receipt/agent-1",
        "topic write fedmq/plant/update/agent-1",
        "topic write fedmq/plant/status/agent-1",
        "topic write fedmq/plant/secagg/up/agent-1",
        "topic read fedmq/plant/secagg/down/agent-1",
    ]
    assert "pattern" not in acl  # no rule that applies to unknown or revoked names


def test_revoke_lists_the_serial_and_removes_the_acl_entry(tmp_path: Path) -> None:
    init(tmp_path, ["agent-1", "agent-2"], group=None)
    ident = revoke(tmp_path, "agent-2", group=None)
    crl = x509.load_pem_x509_crl((tmp_path / "broker" / "crl.pem").read_bytes())
    assert crl.is_signature_valid(cert(tmp_path / "ca" / "ca.crt").public_key())  # type: ignore[arg-type]
    assert crl.get_revoked_certificate_by_serial_number(ident.serial) is not None
    assert cert(tmp_path / "clients" / "agent-2" / "client.crt").serial_number == ident.serial
    acl = (tmp_path / "broker" / "acl").read_text()
    assert "agent-2" not in acl and "user agent-1" in acl
    with pytest.raises(ConfigError, match="revoked"):
        init(tmp_path, ["agent-2"], group=None)
    with pytest.raises(ConfigError, match="no identity"):
        revoke(tmp_path, "agent-9", group=None)


@pytest.mark.parametrize("bad", ["a/b", "a+", "#", "x" * 65, "", "aggregator", "ops", "server"])
def test_init_refuses_ids_that_are_not_one_safe_topic_level(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ConfigError):
        init(tmp_path, [bad], group=None)
    assert not (tmp_path / "pki.json").exists()


def test_parse_agents() -> None:
    assert parse_agents("3") == ["agent-1", "agent-2", "agent-3"]
    assert parse_agents("pi-kitchen, pi-garage") == ["pi-kitchen", "pi-garage"]
    with pytest.raises(ConfigError, match="--agents"):
        parse_agents("a,a")
    with pytest.raises(ConfigError, match="--agents"):
        parse_agents("ok,bad/one")


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="mosquitto_passwd not installed")
def test_password_hash_matches_mosquitto_passwd(tmp_path: Path) -> None:
    pwfile = tmp_path / "pw"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(pwfile), "ops", "s3cret"], check=True)
    theirs = pwfile.read_text().strip().split(":", 1)[1]
    _, _, iterations, salt_b64, _ = theirs.split("$")
    ours = mosquitto_password_hash("s3cret", salt=base64.b64decode(salt_b64), iterations=int(iterations))
    assert ours == theirs


def test_tls_material_from_the_environment_gives_a_verifying_tls_context(tmp_path: Path) -> None:
    init(tmp_path, ["agent-1"], group=None)
    client = tmp_path / "clients" / "agent-1"
    env = {
        "FEDMQ_BROKER__HOST": "localhost",
        "FEDMQ_BROKER__PORT": "8883",
        "FEDMQ_BROKER__CA_FILE": str(client / "ca.crt"),
        "FEDMQ_BROKER__CERT_FILE": str(client / "client.crt"),
        "FEDMQ_BROKER__KEY_FILE": str(client / "client.key"),
    }
    cfg = load_config(None, env=env, role="agent")
    ctx = client_kwargs(cfg.broker)["tls_context"]
    assert ctx.verify_mode is ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.minimum_version is ssl.TLSVersion.TLSv1_2
    with pytest.raises(ConfigError, match=r"broker\.key_file"):
        load_config(None, env=env | {"FEDMQ_BROKER__KEY_FILE": str(tmp_path / "missing.key")}, role="agent")
