"""``fedmq broker``: run the broker in the foreground until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import signal
import threading

from broker.launcher import DEPLOY_CONF, DEV_CONF, BrokerError, start_broker


def configure(p: argparse.ArgumentParser) -> None:
    """Add the command's arguments."""
    p.add_argument("--port", type=int, default=1883, help="listener port (default 1883)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    p.add_argument(
        "--deploy",
        action="store_true",
        help="use broker/mosquitto.conf (authentication, ACL, persistence) instead of the dev config",
    )
    p.add_argument("--embedded", action="store_true", help="use the embedded pure-Python broker (amqtt)")


def run(args: argparse.Namespace) -> int:
    """Start, wait for a signal, stop."""
    try:
        b = start_broker(
            "embedded" if args.embedded else "auto",
            port=args.port,
            host=args.host,
            conf=DEPLOY_CONF if args.deploy else DEV_CONF,
        )
    except BrokerError as exc:
        print(f"fedmq broker: {exc}")
        return 1
    print(f"fedmq broker: {b.kind} listening on mqtt://{b.host}:{b.port} (Ctrl-C to stop)", flush=True)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    b.cleanup()
    return 0
