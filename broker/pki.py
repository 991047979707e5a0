"""Deployment material for a locked-down broker: CA, certificates, CRL, ACL, passwords, config.

``fedmq broker init DIR`` calls :func:`init`; ``fedmq broker revoke DIR NAME`` calls
:func:`revoke`. The folder it writes::

    DIR/pki.json                  registry: every identity, its serial, expiry, revoked or not
    DIR/ca/ca.key  ca.crt         the CA (the key never leaves this folder: keep it offline)
    DIR/broker/                   mount this as the broker's config folder (/mosquitto/config)
        mosquitto.conf            TLS listener (client certificates required, CN = username,
                                  TLS 1.2+), loopback ops listener (password), no anonymous
        ca.crt server.crt server.key crl.pem acl passwd ops.password
    DIR/clients/NAME/             one per agent and one for the aggregator: copy to that device
        ca.crt client.crt client.key

Identities are the certificate's common name, which Mosquitto uses as the username
(``use_identity_as_username``): the ACL grants each name exactly its topics, so a device
can only ever speak as itself. Re-running :func:`init` keeps every existing key and
certificate and adds the new names; :func:`revoke` puts a serial on the CRL and removes the
name from the ACL, then the broker reloads (SIGHUP).

Keys are ECDSA P-256, signatures SHA-256 (the ``cryptography`` package).
"""

from __future__ import annotations

import base64
import datetime as dt
import grp
import hashlib
import ipaddress
import json
import os
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedmq.errors import ConfigError
from fedmq.state import write_atomic
from fedmq.topics import Topics, validate_agent_id

REGISTRY = "pki.json"
REGISTRY_VERSION = 1
OPS_USER = "ops"
CA_DAYS = 3650


@dataclass
class Identity:
    """One certificate holder: an agent, the aggregator or the broker itself."""

    name: str
    role: str  # "agent" | "aggregator" | "server"
    serial: int
    not_after: str
    revoked: bool = False
    revoked_at: str | None = None


@dataclass
class Registry:
    """What ``pki.json`` holds: deployment settings and every identity ever issued."""

    prefix: str
    port: int
    ops_port: int
    config_root: str
    data_dir: str
    hostnames: list[str]
    ips: list[str]
    bind: str = ""
    identities: dict[str, Identity] = field(default_factory=dict)

    def active(self, role: str) -> list[str]:
        """Names of the non-revoked identities with ``role``, sorted."""
        return sorted(n for n, i in self.identities.items() if i.role == role and not i.revoked)


@dataclass(frozen=True)
class InitReport:
    """What :func:`init` did."""

    root: Path
    created: tuple[str, ...]
    kept: tuple[str, ...]


class PkiError(ConfigError):
    """A PKI folder or request is invalid (names the offending key or file)."""


# --- registry ------------------------------------------------------------------------------
def load_registry(root: Path) -> Registry | None:
    """The registry in ``root``, or None if there is none yet."""
    path = root / REGISTRY
    if not path.exists():
        return None
    raw = json.loads(path.read_text())
    if raw.get("version") != REGISTRY_VERSION:
        raise PkiError(str(path), f"registry version {raw.get('version')!r} is not {REGISTRY_VERSION}")
    ids = {n: Identity(**v) for n, v in raw.pop("identities").items()}
    raw.pop("version")
    return Registry(**raw, identities=ids)


def _save_registry(root: Path, reg: Registry) -> None:
    data = asdict(reg)
    data["version"] = REGISTRY_VERSION
    _write(root / REGISTRY, json.dumps(data, indent=2, sort_keys=True) + "\n", 0o644)


# --- files -----------------------------------------------------------------------------------
def _write(path: Path, data: str | bytes, mode: int, gid: int | None = None) -> None:
    """Write atomically with ``mode`` (and group) set before the content lands."""
    write_atomic(path, data.encode() if isinstance(data, str) else data, mode=mode, gid=gid)


def broker_group(requested: str | None = "auto") -> int | None:
    """The group id the broker's secret files should belong to, or None to leave them alone.

    Mosquitto started as root drops to user ``mosquitto`` before it reads the password and
    ACL files (and re-reads them on SIGHUP as that user), so its secrets must be readable by
    that group. ``"auto"``: the ``mosquitto`` group when we run as root and it exists.
    """
    if requested is None or requested == "":
        return None
    if requested == "auto":
        if os.geteuid() != 0:
            return None
        try:
            return grp.getgrnam("mosquitto").gr_gid
        except KeyError:
            return None
    try:
        return grp.getgrnam(requested).gr_gid
    except KeyError:
        raise PkiError("--group", f"no group {requested!r} on this machine") from None


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    pem = serialization.Encoding.PEM
    return key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(str(path), "expected an EC private key")
    return key


# --- certificates ----------------------------------------------------------------------------
def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """CA: sign certificates and CRLs. Leaf (ECDSA): sign the handshake, ECDHE key agreement."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not ca,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _make_ca(days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedmq CA")])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _issue(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    common_name: str,
    *,
    server: bool,
    days: int,
    role: str = "agent",
    hostnames: Sequence[str] = (),
    ips: Sequence[str] = (),
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _new_key()
    now = _now()
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                    # The role, so that a device can tell a device's certificate from the
                    # aggregator's when it checks signed keys (secure aggregation).
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if server:
        sans: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames]
        sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ips]
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def _crl(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, revoked: Iterable[Identity]) -> bytes:
    """A CRL listing ``revoked``, valid until the CA expires.

    OpenSSL refuses every client once a CRL's nextUpdate has passed, so the CRL lives as long
    as the CA; it is re-signed on every revoke.
    """
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - dt.timedelta(minutes=5))
        .next_update(ca_cert.not_valid_after_utc)
    )
    for ident in revoked:
        when = dt.datetime.fromisoformat(ident.revoked_at) if ident.revoked_at else now
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(ident.serial).revocation_date(when).build()
        )
    return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


# --- broker files ----------------------------------------------------------------------------
def mosquitto_password_hash(password: str, *, salt: bytes | None = None, iterations: int = 101) -> str:
    """A Mosquitto 2.x password-file hash (``$7$``: PBKDF2-HMAC-SHA512, as ``mosquitto_passwd`` writes)."""
    salt = salt if salt is not None else secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def _acl_block(user: str, *grants: tuple[str, str]) -> list[str]:
    return [f"user {user}", *(f"topic {access} {topic}" for access, topic in grants), ""]


def render_acl(reg: Registry) -> str:
    """The ACL: each identity gets exactly its topics; revoked ones get nothing.

    Mosquitto denies everything not granted. Agents: read the model, the federation's aggregate
    metrics and the server's status (feedback for a device's operator: no other device's data is in
    them), and their own receipts,
    write their own update and status topics, and their own secure-aggregation topics (write
    ``secagg/up/<name>``, read ``secagg/down/<name>``). The aggregator: read updates, status and
    secure-aggregation messages, write model, server status, metrics, receipts and
    ``secagg/down/+``. The loopback ``ops`` user reads model, metrics
    and status (monitoring, health checks).
    """
    t = Topics(reg.prefix)
    lines = [
        "# Generated by `fedmq broker init`; edit the registry with `fedmq broker init/revoke`, not this file.",
        f"# Federation prefix: {reg.prefix}. Anything not granted here is denied.",
        "",
    ]
    for name in reg.active("aggregator"):
        lines += _acl_block(
            name,
            ("read", t.update_wildcard),
            ("read", t.status_wildcard),
            ("readwrite", t.model),
            ("readwrite", t.server_status),
            ("readwrite", t.metrics),
            ("write", t.receipt("+")),
            ("read", t.secagg_up_wildcard),
            ("write", t.secagg_down("+")),
        )
    lines += _acl_block(
        OPS_USER,
        ("read", t.model),
        ("read", t.metrics),
        ("read", t.server_status),
        ("read", t.status_wildcard),
        ("read", "$SYS/#"),
    )
    for name in reg.active("agent"):
        lines += _acl_block(
            name,
            ("read", t.model),
            ("read", t.metrics),
            ("read", t.server_status),
            ("read", t.receipt(name)),
            ("write", t.update(name)),
            ("write", t.status(name)),
            ("write", t.secagg_up(name)),
            ("read", t.secagg_down(name)),
        )
    return "\n".join(lines)


MAX_QUEUED_MESSAGES = 50_000
MAX_QUEUED_BYTES = 4 << 30
MAX_PACKET_BYTES = 128 << 20
AUTOSAVE_SECONDS = 60
"""The deployment broker's limits: rendered into both the values and the comments that explain them."""


def render_conf(reg: Registry) -> str:
    """``mosquitto.conf`` for the TLS deployment (paths under ``reg.config_root``)."""
    root = reg.config_root.rstrip("/")
    return f"""# Generated by `fedmq broker init`. Mosquitto 2.0: password_file/acl_file are global
# (per_listener_settings false); pin the broker version, 2.1 deprecates them for plugins.
per_listener_settings false
allow_anonymous false
password_file {root}/passwd
acl_file {root}/acl

# Devices and the aggregator: TLS 1.2+, a client certificate signed by our CA is required,
# its common name becomes the MQTT username (the ACL is keyed on it), revoked ones are refused.
listener {reg.port}{" " + reg.bind if reg.bind else ""}
protocol mqtt
cafile {root}/ca.crt
certfile {root}/server.crt
keyfile {root}/server.key
crlfile {root}/crl.pem
require_certificate true
use_identity_as_username true
# The client id is forced to the username: no device can take over (disconnect) another
# device's or the aggregator's session by connecting with its client id.
use_username_as_clientid true
tls_version tlsv1.2

# Operators on the broker host only: user {OPS_USER} (password in ops.password), read-only topics.
# Here too the client id is the username: an ops login asking for the aggregator's client id
# would otherwise disconnect it, and with a clean session discard the updates queued for it.
listener {reg.ops_port} 127.0.0.1
protocol mqtt
use_username_as_clientid true

# Model payloads are large: {MAX_PACKET_BYTES >> 20} MiB packets (Mosquitto 2.1 defaults to 2 MB).
max_packet_size {MAX_PACKET_BYTES}

# Persistent sessions queue updates while the aggregator restarts: {MAX_QUEUED_MESSAGES:,} messages
# or {MAX_QUEUED_BYTES >> 30} GiB, whichever comes first; beyond that Mosquitto drops silently.
max_queued_messages {MAX_QUEUED_MESSAGES}
max_queued_bytes {MAX_QUEUED_BYTES}
max_inflight_messages 20
# Small control messages (receipts, status) go out at once, not after Nagle's 40 ms delayed-ACK wait.
set_tcp_nodelay true

# A PUBACK is not an fsync: the database is written at exit and every {AUTOSAVE_SECONDS} s.
persistence true
persistence_location {reg.data_dir.rstrip("/")}/
autosave_interval {AUTOSAVE_SECONDS}

log_dest stderr
log_type error
log_type warning
log_type notice
connection_messages true
"""


def _write_broker_files(
    root: Path, reg: Registry, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, gid: int | None
) -> None:
    broker = root / "broker"
    revoked = [i for i in reg.identities.values() if i.revoked]
    _write(broker / "crl.pem", _crl(ca_key, ca_cert, revoked), 0o644)
    _write(broker / "acl", render_acl(reg), 0o640, gid)
    _write(broker / "mosquitto.conf", render_conf(reg), 0o644)


# --- commands --------------------------------------------------------------------------------
def parse_agents(spec: str) -> list[str]:
    """``"3"`` -> agent-1..agent-3; ``"a,b"`` -> [a, b]. Each name is validated as an agent id."""
    spec = spec.strip()
    if spec.isdigit():
        count = int(spec)
        if not 0 <= count <= 100_000:
            raise PkiError("--agents", f"agent count must be 0-100000, got {count}")
        return [f"agent-{i}" for i in range(1, count + 1)]
    names = [s.strip() for s in spec.split(",") if s.strip()]
    for name in names:
        validate_agent_id(name, key="--agents")
    if len(set(names)) != len(names):
        raise PkiError("--agents", "names repeat")
    return names


def init(
    root: Path,
    agents: Sequence[str],
    *,
    aggregator: str = "aggregator",
    prefix: str = "fedmq/default",
    port: int = 8883,
    ops_port: int = 1884,
    hostnames: Sequence[str] = ("localhost",),
    ips: Sequence[str] = ("127.0.0.1",),
    config_root: str | None = None,
    data_dir: str | None = None,
    bind: str = "",
    days: int = 825,
    group: str | None = "auto",
) -> InitReport:
    """Create or extend the deployment folder ``root``; existing identities are kept as they are.

    Deployment settings (prefix, ports, host names, paths) are fixed by the first run; later
    runs only add identities and rewrite the derived files (ACL, CRL, config). The broker's
    secrets (server key, password file, ACL) go to ``group`` (see :func:`broker_group`).
    """
    root = Path(root).resolve()
    gid = broker_group(group)
    validate_agent_id(aggregator, key="--aggregator")
    for n in agents:
        validate_agent_id(n, key="--agents")
        if n in (aggregator, OPS_USER):
            raise PkiError("--agents", f"{n!r} is reserved for the aggregator or operators")
    if days < 1:
        raise PkiError("--days", "must be >= 1")
    Topics(prefix)  # validates
    reg = load_registry(root)
    if reg is None:
        if not (0 < port < 65536 and 0 < ops_port < 65536 and port != ops_port):
            raise PkiError("--port", "ports must be distinct and in 1-65535")
        reg = Registry(
            prefix=prefix,
            port=port,
            ops_port=ops_port,
            config_root=config_root or str(root / "broker"),
            data_dir=data_dir or str(root / "broker" / "data"),
            hostnames=list(hostnames),
            ips=list(ips),
            bind=bind,
        )
        ca_key, ca_cert = _make_ca(CA_DAYS)
        _write(root / "ca" / "ca.key", _key_pem(ca_key), 0o600)
        _write(root / "ca" / "ca.crt", _cert_pem(ca_cert), 0o644)
    else:
        ca_key = _load_key(root / "ca" / "ca.key")
        ca_cert = x509.load_pem_x509_certificate((root / "ca" / "ca.crt").read_bytes())
    for ip in reg.ips:
        ipaddress.ip_address(ip)

    ca_pem = _cert_pem(ca_cert)
    created: list[str] = []
    kept: list[str] = []
    wanted = [("broker", "server"), (aggregator, "aggregator")] + [(n, "agent") for n in agents]
    for name, role in wanted:
        have = reg.identities.get(name)
        if have is not None:
            if have.role != role:
                raise PkiError("--agents", f"{name!r} already exists as {have.role}")
            if have.revoked:
                raise PkiError("--agents", f"{name!r} was revoked; issue a new name instead of reusing it")
            kept.append(name)
            continue
        key, cert = _issue(
            ca_key, ca_cert, name, server=role == "server", days=days, role=role, hostnames=reg.hostnames, ips=reg.ips
        )
        if role == "server":
            _write(root / "broker" / "server.key", _key_pem(key), 0o640, gid)
            _write(root / "broker" / "server.crt", _cert_pem(cert), 0o644)
        else:
            client = root / "clients" / name
            _write(client / "client.key", _key_pem(key), 0o600)
            _write(client / "client.crt", _cert_pem(cert), 0o644)
            _write(client / "ca.crt", ca_pem, 0o644)
        reg.identities[name] = Identity(name, role, cert.serial_number, cert.not_valid_after_utc.isoformat())
        created.append(name)

    _write(root / "broker" / "ca.crt", ca_pem, 0o644)
    ops_password_file = root / "broker" / "ops.password"
    if not ops_password_file.exists():
        password = secrets.token_urlsafe(24)
        _write(ops_password_file, password + "\n", 0o600)
        _write(root / "broker" / "passwd", f"{OPS_USER}:{mosquitto_password_hash(password)}\n", 0o640, gid)
    data = root / "broker" / "data"
    data.mkdir(parents=True, exist_ok=True)
    if gid is not None:  # Mosquitto writes its persistence database as its own user
        os.chown(data, -1, gid)
        data.chmod(0o770)
    _write_broker_files(root, reg, ca_key, ca_cert, gid)
    _save_registry(root, reg)
    return InitReport(root, tuple(created), tuple(kept))


def revoke(root: Path, name: str, *, group: str | None = "auto") -> Identity:
    """Revoke ``name``: its serial goes on the CRL and its ACL entries are removed.

    The broker applies both on reload (SIGHUP): new connections with the certificate fail
    the TLS handshake, and a connection still open loses every permission.
    """
    root = Path(root).resolve()
    reg = load_registry(root)
    if reg is None:
        raise PkiError(str(root), f"no {REGISTRY} here: run `fedmq broker init` first")
    ident = reg.identities.get(name)
    if ident is None:
        raise PkiError("name", f"no identity {name!r} in {root / REGISTRY}")
    if ident.role == "server":
        raise PkiError("name", "the broker's own certificate cannot be revoked; re-run init in a new folder")
    if not ident.revoked:
        ident.revoked = True
        ident.revoked_at = _now().isoformat()
    ca_key = _load_key(root / "ca" / "ca.key")
    ca_cert = x509.load_pem_x509_certificate((root / "ca" / "ca.crt").read_bytes())
    _write_broker_files(root, reg, ca_key, ca_cert, broker_group(group))
    _save_registry(root, reg)
    return ident


def certificate_common_name(cert_file: str | Path) -> str:
    """The common name of a PEM certificate (an agent's default id is its certificate's CN)."""
    cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not attrs:
        raise PkiError("broker.cert_file", f"{cert_file} has no common name")
    return str(attrs[0].value)
