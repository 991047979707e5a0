"""``fedmq broker``: run a broker, or create and manage a secured deployment's material.

Actions::

    fedmq broker [run] [--port 1883] [--deploy | --conf FILE]   run until SIGTERM/SIGINT
    fedmq broker init DIR --agents 3                          CA, certificates, ACL, config
    fedmq broker revoke DIR NAME [--reload PID]               CRL + ACL, then SIGHUP the broker
    fedmq broker list DIR                                     identities and their state
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
import tomllib
from pathlib import Path
from typing import Any

from broker.launcher import DEPLOY_CONF, DEV_CONF, BrokerError, EmbeddedBroker, MosquittoBroker, start_broker
from broker.pki import init, load_registry, parse_agents, revoke
from fedmq.errors import ConfigError
from runtime.extras import require


def _add_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=int, default=1883, help="listener port (default 1883)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    p.add_argument(
        "--deploy",
        action="store_true",
        help="use broker/mosquitto.conf (password authentication, ACL, persistence) instead of the dev config",
    )
    p.add_argument(
        "--conf",
        type=Path,
        help="run Mosquitto on this config exactly as written (e.g. DIR/broker/mosquitto.conf from init); "
        "--port must name its first listener",
    )
    p.add_argument("--embedded", action="store_true", help="use the embedded pure-Python broker (amqtt)")
    p.add_argument(
        "--engine",
        choices=["mosquitto", "nats"],
        default="mosquitto",
        help="mosquitto (one node) or nats: a local cluster with MQTT and JetStream on every node",
    )
    p.add_argument("--nodes", type=int, default=3, help="--engine nats: how many nodes (default 3)")


def configure(p: argparse.ArgumentParser) -> None:
    """Add the command's arguments."""
    _add_run(p)
    sub = p.add_subparsers(dest="broker_command", metavar="ACTION")
    _add_run(sub.add_parser("run", help="run the broker (the default)"))

    pi = sub.add_parser(
        "init",
        help="create or extend a TLS deployment: CA, certificates, ACL, password file, mosquitto.conf",
        description="Create DIR, or add agents to it: existing keys and certificates are kept.",
    )
    pi.add_argument("dir", type=Path)
    pi.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="TOML with an [init] table of these options (contrib/config/broker.toml); flags given here win",
    )
    pi.add_argument("--agents", help="a count (agent-1..agent-N) or a comma-separated list of ids (default 0)")
    pi.add_argument("--aggregator", help="the aggregator's identity (default aggregator)")
    pi.add_argument("--prefix", help="federation topic prefix the ACL is written for (default fedmq/default)")
    pi.add_argument("--port", type=int, help="TLS listener port (default 8883)")
    pi.add_argument("--bind", help="TLS listener address (default: all interfaces)")
    pi.add_argument("--ops-port", type=int, help="loopback operator listener port (default 1884)")
    pi.add_argument(
        "--hostname",
        action="append",
        dest="hostnames",
        help="DNS name clients use to reach the broker (repeatable; default localhost)",
    )
    pi.add_argument("--ip", action="append", dest="ips", help="IP address in the server certificate (repeatable)")
    pi.add_argument(
        "--config-root",
        help="where the broker will see DIR/broker (default: its absolute path; /mosquitto/config in compose)",
    )
    pi.add_argument("--data-dir", help="Mosquitto persistence folder as the broker sees it")
    pi.add_argument("--days", type=int, help="validity of new certificates (default 825)")
    pi.add_argument(
        "--group",
        help="group owning the broker's secrets (default: mosquitto when run as root; '' to leave alone)",
    )
    pi.add_argument(
        "--reload",
        type=int,
        metavar="PID",
        help="send SIGHUP to this Mosquitto process after adding identities (default: the broker that "
        "`fedmq broker --conf DIR/broker/mosquitto.conf` runs, found by its pid file)",
    )

    pr = sub.add_parser("revoke", help="revoke an identity (CRL + ACL) and optionally reload the broker")
    pr.add_argument("dir", type=Path)
    pr.add_argument("name")
    pr.add_argument("--reload", type=int, metavar="PID", help="send SIGHUP to this Mosquitto process")
    pr.add_argument("--group", default="auto", help="as for init")

    pl = sub.add_parser("list", help="list the identities of a deployment")
    pl.add_argument("dir", type=Path)


def run(args: argparse.Namespace) -> int:
    """Dispatch on the action (``run`` when none is given)."""
    action = args.broker_command or "run"
    if action == "init":
        return _init(args)
    if action == "revoke":
        return _revoke(args)
    if action == "list":
        return _list(args)
    return _run(args)


INIT_DEFAULTS: dict[str, Any] = {
    "agents": "0",
    "aggregator": "aggregator",
    "prefix": "fedmq/default",
    "port": 8883,
    "bind": "",
    "ops_port": 1884,
    "hostnames": ["localhost"],
    "ips": ["127.0.0.1"],
    "config_root": None,
    "data_dir": None,
    "days": 825,
    "group": "auto",
}
"""``fedmq broker init``'s options and defaults; the keys of a config file's ``[init]`` table."""


def init_options(args: argparse.Namespace) -> dict[str, Any]:
    """The init options: the flags given, then the ``--config`` file's ``[init]`` table, then the defaults."""
    from_file: dict[str, Any] = {}
    if args.config is not None:
        try:
            tree = tomllib.loads(args.config.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError("--config", f"{args.config}: {exc}") from None
        from_file = tree.get("init", {})
        if not isinstance(from_file, dict):
            raise ConfigError("init", "must be a table")
        for key, value in from_file.items():
            if key not in INIT_DEFAULTS:
                raise ConfigError(f"init.{key}", f"unknown key (known: {', '.join(INIT_DEFAULTS)})")
            default = INIT_DEFAULTS[key]
            if key == "agents" and isinstance(value, list):
                from_file[key] = value = ",".join(str(v) for v in value)
            if default is not None and not isinstance(value, type(default)):
                raise ConfigError(f"init.{key}", f"must be {type(default).__name__}, got {value!r}")
    out = {}
    for key, default in INIT_DEFAULTS.items():
        given = getattr(args, key)
        out[key] = given if given is not None else from_file.get(key, default)
    return out


def _init(args: argparse.Namespace) -> int:
    o = init_options(args)
    report = init(
        args.dir,
        parse_agents(str(o["agents"])),
        aggregator=o["aggregator"],
        prefix=o["prefix"],
        port=o["port"],
        ops_port=o["ops_port"],
        hostnames=o["hostnames"],
        ips=o["ips"],
        config_root=o["config_root"],
        data_dir=o["data_dir"],
        bind=o["bind"],
        days=o["days"],
        group=o["group"],
    )
    root = report.root
    print(f"fedmq broker init: {root}")
    print(f"  created: {', '.join(report.created) or '-'}")
    if report.kept:
        print(f"  kept:    {', '.join(report.kept)}")
    print(f"  broker:  mosquitto -c {root / 'broker' / 'mosquitto.conf'}")
    print(f"  clients: {root / 'clients'}/NAME/{{ca.crt,client.crt,client.key}} (copy to each device)")
    print(f"  keep {root / 'ca' / 'ca.key'} offline; it signs every certificate")
    if report.created and report.kept:  # an existing deployment grew: its broker must reload the ACL
        _reload(root, args.reload, "the new identities can connect and use their topics")
    return 0


def pid_file(root: Path) -> Path:
    """Where ``fedmq broker --conf ROOT/broker/mosquitto.conf`` records its Mosquitto's process id."""
    return root / "broker" / "mosquitto.pid"


def _running_broker(root: Path) -> int | None:
    """The pid in the deployment's pid file, if that process is alive."""
    try:
        pid = int(pid_file(root).read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def _reload(root: Path, pid: int | None, what: str) -> None:
    """SIGHUP the deployment's broker (it re-reads ACL, passwords and CRL), or say how to."""
    pid = pid if pid is not None else _running_broker(root)
    if pid is None:
        print(
            f"  NEXT: reload a running broker so that {what}; until then it refuses them:\n"
            "        kill -HUP $(pidof mosquitto)   (systemd: systemctl reload fedmq-broker; "
            "compose: docker compose kill -s HUP mosquitto)"
        )
        return
    os.kill(pid, signal.SIGHUP)
    print(f"  sent SIGHUP to the broker (pid {pid}): it reloaded the ACL and CRL, so {what}")


def _revoke(args: argparse.Namespace) -> int:
    ident = revoke(args.dir, args.name, group=args.group)
    print(f"fedmq broker revoke: {ident.name} (serial {ident.serial:x}) is on the CRL and out of the ACL")
    _reload(Path(args.dir), args.reload, f"{ident.name} is refused")
    return 0


def _list(args: argparse.Namespace) -> int:
    reg = load_registry(args.dir)
    if reg is None:
        print(f"fedmq broker list: no deployment in {args.dir}")
        return 1
    print(f"prefix {reg.prefix}, TLS port {reg.port}, ops port {reg.ops_port}")
    for name, ident in sorted(reg.identities.items()):
        state = f"revoked {ident.revoked_at}" if ident.revoked else f"valid until {ident.not_after}"
        print(f"  {name:<24} {ident.role:<11} {state}")
    return 0


def run_cluster(nodes: int, host: str) -> int:
    """``fedmq broker --engine nats`` and ``fedmq cluster``: a local NATS cluster until SIGTERM/SIGINT."""
    from broker.nats import NatsCluster

    try:
        cluster = NatsCluster(nodes, host=host).start()
    except BrokerError as exc:
        print(f"fedmq broker: {exc}")
        return 1
    print(f"fedmq broker: a {nodes}-node NATS cluster with MQTT and JetStream (Ctrl-C to stop)", flush=True)
    for node in cluster.nodes:
        print(f"  {node.name}: {node.url}  (NATS nats://{node.host}:{node.client_port})", flush=True)
    print(f"  configs and logs: {cluster.workdir}", flush=True)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    try:
        done.wait()
    finally:
        cluster.cleanup()
    return 0


def _run(args: argparse.Namespace) -> int:
    b: MosquittoBroker | EmbeddedBroker
    if args.engine == "nats":
        if args.embedded or args.conf is not None or args.deploy:
            raise ConfigError("--engine", "nats runs its own cluster configuration: no --embedded, --conf or --deploy")
        return run_cluster(args.nodes, args.host)
    if args.embedded:
        require("demo", key="--embedded", why="the embedded broker", modules=("amqtt",))
    try:
        if args.conf is not None:
            b = MosquittoBroker(port=args.port, host=args.host, conf=args.conf, render=False).start()
        else:
            b = start_broker(
                "embedded" if args.embedded else "auto",
                port=args.port,
                host=args.host,
                conf=DEPLOY_CONF if args.deploy else DEV_CONF,
            )
    except BrokerError as exc:
        print(f"fedmq broker: {exc}")
        return 1
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    pid_path: Path | None = None
    if isinstance(b, MosquittoBroker):
        mosquitto = b
        signal.signal(signal.SIGHUP, lambda *_: mosquitto.reload())  # reload CRL, ACL, passwords
        if args.conf is not None and args.conf.parent.name == "broker" and mosquitto.proc is not None:
            # A deployment from `fedmq broker init`: init and revoke find the broker to reload here.
            pid_path = pid_file(args.conf.parent.parent)
            pid_path.write_text(f"{mosquitto.proc.pid}\n")
    scheme = "mqtts" if args.conf is not None and "require_certificate true" in args.conf.read_text() else "mqtt"
    print(f"fedmq broker: {b.kind} listening on {scheme}://{b.host}:{b.port} (Ctrl-C to stop)", flush=True)
    try:
        done.wait()
    finally:
        if pid_path is not None:
            pid_path.unlink(missing_ok=True)
        b.cleanup()
    return 0
