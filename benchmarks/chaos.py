"""Chaos soak: kill -9 the aggregator many times while agents publish, then audit every receipt.

    python benchmarks/chaos.py                       # 50 aggregator kills, 20 agents
    python benchmarks/chaos.py --kills 200 --agents 50 --uptime 0.3,2.0
    python benchmarks/chaos.py --kills 50 --broker-kills 20   # the broker killed too
    python benchmarks/chaos.py --kills 100 --checkpoint-disconnects 40 --checkpoint-every 1   # issue 11
    python benchmarks/chaos.py --kills 100 --corruptions 100   # bit flips between kills

Starts its own Mosquitto (the project's dev config on a free loopback port), runs
:func:`simulator.chaos.run_chaos` and prints what was sent, receipted, applied, dropped as
duplicate and lost (must be 0), and whether the final model equals a replay of the receipts.
Exit status 1 if any check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
from pathlib import Path

from broker.launcher import MosquittoBroker
from simulator.chaos import ChaosConfig, format_report, run_chaos


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=50)
    p.add_argument("--agents", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--uptime", default="0.5,1.5", help="min,max seconds between kills (default 0.5,1.5)")
    p.add_argument("--buffer-size", type=int, default=4)
    p.add_argument("--broker-kills", type=int, default=0, help="also kill -9 the broker this many times")
    p.add_argument(
        "--checkpoint-disconnects", type=int, default=0, help="broker kills timed to land while a checkpoint is written"
    )
    p.add_argument("--corruptions", type=int, default=0, help="bit flips in the state files between kills")
    p.add_argument("--checkpoint-every", type=int, default=5, help="versions between checkpoints (default 5)")
    p.add_argument("--model", default="softmax", help="softmax or mlp (a larger checkpoint takes longer to write)")
    args = p.parse_args()
    lo, hi = (float(x) for x in args.uptime.split(","))
    logging.basicConfig(level=logging.ERROR)  # reconnect warnings are expected here: hundreds of them
    with tempfile.TemporaryDirectory(prefix="fedmq-chaos-") as work:
        broker = MosquittoBroker(workdir=Path(work) / "broker")
        broker.start()
        try:
            cfg = ChaosConfig(
                host=broker.host,
                port=broker.port,
                workdir=Path(work),
                agents=args.agents,
                kills=args.kills,
                seed=args.seed,
                uptime=(lo, hi),
                buffer_size=args.buffer_size,
                broker=broker,
                broker_kills=args.broker_kills,
                checkpoint_disconnects=args.checkpoint_disconnects,
                corruptions=args.corruptions,
                checkpoint_every=args.checkpoint_every,
                model=args.model,
            )
            report = asyncio.run(run_chaos(cfg))
        finally:
            broker.cleanup()
    print(
        f"chaos soak: {args.kills} aggregator and {args.broker_kills} broker kills, {args.checkpoint_disconnects} "
        f"broker kills during checkpoints, {args.corruptions} bit flips (each after a kill of its own), "
        f"{args.agents} agents, FedBuff "
        f"K={args.buffer_size}, checkpoint every {args.checkpoint_every}, {args.model}, seed {args.seed}"
    )
    print(format_report(report))
    for problem in report.problems:
        print(f"  PROBLEM: {problem}")
    print("  result: " + ("OK" if report.ok else "FAILED"))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
