"""``fedmq cluster``: the same as ``fedmq broker --engine nats --nodes N``, a local NATS cluster."""

from __future__ import annotations

import argparse

from broker.cli import run_cluster


def configure(p: argparse.ArgumentParser) -> None:
    """Add the command's arguments."""
    p.add_argument("--nodes", type=int, default=3, help="how many nodes (default 3: one may fail)")
    p.add_argument("--host", default="127.0.0.1", help="the address every listener binds (default loopback)")


def run(args: argparse.Namespace) -> int:
    """Run the cluster until SIGTERM or SIGINT."""
    return run_cluster(args.nodes, args.host)
