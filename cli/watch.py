"""``fedmq watch BROKER``: a live terminal view of a federation's metrics topic.

It subscribes to ``{prefix}/metrics`` (retained, so the last figures show at once) and the
aggregator's status, decodes them (msgpack, never pickle) and redraws one screen per message:
version, accuracy, agents, updates, rejections by reason, epsilon. Without a terminal (a pipe,
a log), or with ``--once``, it prints plain lines instead. Any identity may run it: the
deployment ACL lets devices read the aggregate metrics (docs/protocol.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

import aiomqtt

from fedmq.codec import DecodeLimits
from fedmq.errors import ConfigError, DecodeError
from fedmq.messages import StatusMessage, metrics_from_bytes
from runtime.args import add_common, load_from_args
from runtime.process import run_until_signalled
from runtime.transport import client_kwargs, describe_failure

LIMITS = DecodeLimits(max_payload_bytes=1024 * 1024)


def configure(p: argparse.ArgumentParser) -> None:
    """Add the command's arguments."""
    p.add_argument(
        "url",
        nargs="?",
        metavar="BROKER",
        help="mqtt://host:port or mqtts://host:port (default: --broker, the config file, or mqtt://127.0.0.1:1883)",
    )
    add_common(p)
    p.add_argument("--once", action="store_true", help="print the current metrics once and exit")
    p.add_argument("--json", action="store_true", help="print each metrics message as one JSON line")
    p.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="with --once: how long to wait for metrics (default 30)",
    )


def render(metrics: Mapping[str, Any], server: str | None, *, width: int = 78) -> str:
    """The screen for one metrics message."""
    acc = metrics.get("accuracy")
    loss = metrics.get("loss")
    eps = metrics.get("max_epsilon") or 0.0
    lines = [
        f"fedmq  run {metrics.get('run') or '-'}  aggregator {server or '?'}  up {metrics.get('elapsed', 0):.0f} s",
        "-" * width,
        f"model version   {metrics.get('version', 0):>10}    accuracy  {_num(acc, 4):>8}    loss {_num(loss, 4):>8}",
        f"agents online   {metrics.get('agents_online', 0):>10}    offline   {metrics.get('agents_offline', 0):>8}",
        f"accepted        {metrics.get('accepted', 0):>10}    rejected  {metrics.get('rejected', 0):>8}"
        f"    re-sends {metrics.get('duplicates', 0):>6}",
        f"mean staleness  {metrics.get('mean_staleness', 0.0):>10.2f}    epsilon   {_num(eps if eps else None, 3):>8}"
        f"    storage {metrics.get('storage', '-')}",
    ]
    rejected = metrics.get("rejected_by_reason") or {}
    retried = metrics.get("retried_by_reason") or {}
    if rejected:
        lines.append("rejected by reason: " + ", ".join(f"{k} {v}" for k, v in sorted(rejected.items())))
    if retried:
        lines.append("told to retry:      " + ", ".join(f"{k} {v}" for k, v in sorted(retried.items())))
    if metrics.get("secure_aggregation"):
        lines.append(
            f"secure aggregation: {metrics.get('cohorts_applied', 0)} cohorts applied, "
            f"{metrics.get('cohorts_abandoned', 0)} abandoned, {len(metrics.get('cohorts_open') or {})} open"
        )
    return "\n".join(lines)


def _num(x: Any, digits: int) -> str:
    return "-" if x is None else f"{float(x):.{digits}f}"


async def watch(args: argparse.Namespace, stop: asyncio.Event, out: TextIO) -> int:
    """Subscribe and print until ``stop`` (or, with ``--once``, the first metrics message)."""
    config = load_from_args(args, "watch")
    topics = config.topics
    tty = out.isatty() and not args.json and not args.once
    server: str | None = None
    try:
        async with aiomqtt.Client(**client_kwargs(config.broker), identifier=f"fedmq-watch-{time.time_ns()}") as client:
            await client.subscribe(topics.metrics, qos=0)
            await client.subscribe(topics.server_status, qos=0)
            async with asyncio.timeout(args.timeout if args.once else None):
                async for msg in client.messages:
                    payload = msg.payload if isinstance(msg.payload, (bytes, bytearray)) else b""
                    if msg.topic.value == topics.server_status:
                        try:
                            server = StatusMessage.from_bytes(bytes(payload), LIMITS).state
                        except DecodeError:
                            server = "?"
                        continue
                    try:
                        metrics = metrics_from_bytes(bytes(payload), LIMITS)
                    except DecodeError as exc:
                        print(f"fedmq watch: undecodable metrics message ({exc})", file=sys.stderr)
                        continue
                    if args.json:
                        print(json.dumps(metrics, default=str), file=out, flush=True)
                    elif tty:
                        print("\x1b[H\x1b[2J" + render(metrics, server), file=out, flush=True)
                    else:
                        print(render(metrics, server) + "\n", file=out, flush=True)
                    if args.once or stop.is_set():
                        return 0
    except TimeoutError:
        print(f"fedmq watch: no metrics on {topics.metrics} within {args.timeout:g} s", file=sys.stderr)
        return 1
    except aiomqtt.MqttError as exc:
        raise ConfigError("--broker", f"cannot watch: {describe_failure(exc, config.broker)}") from None
    return 0


def run(args: argparse.Namespace) -> int:
    """Watch until Ctrl-C (or once)."""
    if args.url:
        if args.broker:
            raise ConfigError("--broker", "give the broker once: as BROKER or as --broker")
        args.broker = args.url

    async def main(stop: asyncio.Event) -> int:
        task = asyncio.ensure_future(watch(args, stop, sys.stdout))
        waiter = asyncio.ensure_future(stop.wait())
        await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if not task.done():
            task.cancel()
            return 0
        return task.result()

    return run_until_signalled(main)
