"""Fleet scale: how many connected devices one machine sustains with one Mosquitto and one aggregator.

    python benchmarks/fleet.py [--sizes 1000,5000,10000] [--interval 30] [--steady 60]

For each fleet size: a fresh Mosquitto (the project's dev config) and a real ``fedmq
aggregator`` process (FedBuff K=100, the digits softmax model) on this machine, and the
simulated fleet (:mod:`simulator.fleet`) in this process, every device one MQTT connection
on one event loop, subscribed to the model and its receipts, with a Will and a retained
status. After the whole fleet is connected, each device sends a status heartbeat every 15 s
(as ``fedmq agent`` does) and an update at log-normal
intervals (mean ``--interval`` s, sigma 1) for ``--steady`` seconds (the first 10 s are a
warm-up and not measured).

Printed per size: connect time, connections refused, updates/s, receipt latency
percentiles, and CPU (share of one core) and memory of the aggregator, Mosquitto and the
fleet process. The aggregator's published metrics must count every device online.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from broker.launcher import MosquittoBroker
from fedmq.messages import ModelMessage, metrics_from_bytes
from simulator.fleet import Fleet, FleetConfig, percentiles
from simulator.measure import first_payload, proc_stats

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 10.0


async def run_size(agents: int, args: argparse.Namespace) -> dict[str, object]:
    cfg = FleetConfig(agents=agents, interval=args.interval, steady=args.steady, seed=args.seed)
    broker = MosquittoBroker().start()
    agg = subprocess.Popen(
        [sys.executable, "-m", "cli", "aggregator", "--broker", broker.url, "--prefix", cfg.prefix,
         "--rule", "fedbuff", "--buffer-size", "100", "--model-interval", str(args.model_interval),
         "--model", "softmax", "--num-features", "64",
         "--num-classes", "10", "--max-staleness", "1000000", "--agent-timeout", "3600", "--log-level", "ERROR"],
        cwd=ROOT, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    fleet: Fleet | None = None
    try:
        model = ModelMessage.from_bytes(await first_payload(broker.host, broker.port, f"{cfg.prefix}/model"))
        rng = np.random.default_rng(0)
        delta = {k: (0.01 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in model.tensors.items()}
        fleet = Fleet(cfg, broker.host, broker.port, delta)
        assert broker.proc is not None
        connect_s, failed = await fleet.connect_all()
        await fleet.run_traffic(WARMUP)
        fleet.measuring = True
        a0, b0, f0, t0 = proc_stats(agg.pid), proc_stats(broker.proc.pid), time.process_time(), time.monotonic()
        sent0 = fleet.updates_sent
        await fleet.run_traffic(args.steady)
        a1, b1, f1, t1 = proc_stats(agg.pid), proc_stats(broker.proc.pid), time.process_time(), time.monotonic()
        sent = fleet.updates_sent - sent0
        await asyncio.sleep(2.0)  # let the last receipts arrive (counted, not timed into the rate)
        metrics = metrics_from_bytes(await first_payload(broker.host, broker.port, f"{cfg.prefix}/metrics"))
        wall = t1 - t0
        return {
            "agents": agents,
            "connected": sum(d.conn is not None for d in fleet.devices.values()),
            "refused": failed,
            "connect_s": round(connect_s, 1),
            "online_per_aggregator": metrics.get("agents_online"),
            "updates_per_s": round(sent / wall, 1),
            "accepted": fleet.accepted,
            "rejected": fleet.rejected,
            "latency_ms": {k: round(v, 1) for k, v in percentiles(fleet.latencies).items()},
            "aggregator_cpu": round((a1["cpu_s"] - a0["cpu_s"]) / wall, 3),
            "aggregator_rss_mib": round(a1["rss_mib"], 1),
            "broker_cpu": round((b1["cpu_s"] - b0["cpu_s"]) / wall, 3),
            "broker_rss_mib": round(b1["rss_mib"], 1),
            "fleet_cpu": round((f1 - f0) / wall, 3),
            "fleet_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "models_received": fleet.models_received,
        }
    finally:
        if fleet is not None:
            fleet.close()
        agg.terminate()
        agg.wait(30)
        broker.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,5000,10000")
    ap.add_argument("--interval", type=float, default=30.0, help="mean seconds between one device's updates")
    ap.add_argument("--steady", type=float, default=60.0, help="measured seconds of traffic")
    ap.add_argument("--model-interval", type=float, default=1.0, help="aggregator.model_interval (0: every version)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    print(
        f"fleet: one Mosquitto, one fedmq aggregator (FedBuff K=100, model published at most every "
        f"{args.model_interval:g} s), devices on one event loop; fd limit {soft}"
    )
    print(f"updates every {args.interval:g} s per device on average (log-normal, sigma 1); {args.steady:g} s measured")
    head = (
        f"{'agents':>7} {'connected':>9} {'connect s':>9} {'online':>7} {'upd/s':>7} {'accepted':>8} "
        f"{'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'max ms':>7} | {'agg CPU':>7} {'agg MiB':>7} "
        f"{'mosq CPU':>8} {'mosq MiB':>8} {'fleet CPU':>9}"
    )
    print(head)
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        r = asyncio.run(run_size(size, args))
        rows.append(r)
        lat = r["latency_ms"]
        assert isinstance(lat, dict)
        print(
            f"{r['agents']:>7} {r['connected']:>9} {r['connect_s']:>9} {r['online_per_aggregator']!s:>7} "
            f"{r['updates_per_s']:>7} {r['accepted']:>8} {lat.get('p50', 0):>7} {lat.get('p90', 0):>7} "
            f"{lat.get('p99', 0):>7} {lat.get('max', 0):>7} | {r['aggregator_cpu']:>7.0%} {r['aggregator_rss_mib']:>7} "
            f"{r['broker_cpu']:>8.0%} {r['broker_rss_mib']:>8} {r['fleet_cpu']:>9.0%}",
            flush=True,
        )
        if r["rejected"]:
            print(f"        rejected: {r['rejected']}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
