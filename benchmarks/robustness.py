"""Robust aggregation under attack: final test accuracy for rule x attack x malicious fraction.

Every cell is a real federation over one Mosquitto: 50 agents on the digits task (Dirichlet
0.5 split, log-normal stragglers with a slow tenth), FedBuff with K = 20 and server learning
rate 0.5, for a fixed wall-clock duration; only the buffer's reduction and the attack change.

    python benchmarks/robustness.py                      # the matrix of docs/robustness.md
    python benchmarks/robustness.py --dp                 # the same with local DP (z = 0.5)
    python benchmarks/robustness.py --fractions 0.2 --attacks sign_flip --rules none,median

Prints one table per rule (rows: malicious fraction; columns: attack) and, with
``--markdown PATH``, writes it as Markdown. The f = 0 cell is the rule's clean run; the
"clean" reference for the target is plain FedBuff at f = 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from broker.launcher import start_broker
from fedmq.config import PrivacyConfig
from simulator.harness import SimConfig, run_federation, split_task

RULES = ("none", "norm_bound", "median", "trimmed_mean", "krum")
ATTACKS = ("sign_flip", "scale", "gaussian", "label_flip", "alie", "window", "inflate", "fast")
ROBUST_KW: dict[str, dict[str, Any]] = {
    "none": {},
    "norm_bound": {"norm_bound": 0.0},  # adaptive: the buffer's median norm
    "median": {},
    "trimmed_mean": {"trim_fraction": 0.3},
    "krum": {"krum_f": 8, "krum_m": 12},  # K = 20 >= 2f + 3
}


def cell_config(base: SimConfig, rule: str, attack: str, fraction: float, n: int) -> SimConfig:
    agg = replace(base.aggregator, robust=rule, **ROBUST_KW[rule])
    return replace(
        base,
        aggregator=agg,
        attack=attack if fraction > 0 else "none",
        malicious_fraction=fraction,
        prefix=f"fedmq/robust{n}",
    )


async def run_matrix(args: argparse.Namespace) -> dict[str, dict[str, dict[str, float]]]:
    privacy = PrivacyConfig(enabled=args.dp, clip_norm=1.0, noise_multiplier=0.5)
    base = SimConfig(
        agents=args.agents, duration=args.duration, seed=args.seed, privacy=privacy, conforming_attack=args.conform
    )
    agg = replace(base.aggregator, buffer_size=20)  # docs/robustness.md: K = 20
    if args.rate_limit is not None:
        agg = replace(agg, rate_limit=args.rate_limit)
    base = replace(base, aggregator=agg).validate()
    shards, test = split_task(base)
    broker = await asyncio.to_thread(start_broker, "mosquitto")
    results: dict[str, dict[str, dict[str, float]]] = {}
    n = 0
    try:
        for rule in args.rules:
            results[rule] = {}
            for fraction in args.fractions:
                row: dict[str, float] = {}
                for attack in args.attacks if fraction > 0 else ["clean"]:
                    n += 1
                    cfg = cell_config(base, rule, attack, fraction, n).validate()
                    t0 = time.monotonic()
                    s = await run_federation(cfg, broker.host, broker.port, shards=shards, test=test)
                    row[attack] = float(s["final_accuracy"] or 0.0)
                    print(
                        f"  {rule:<13} f={fraction:<4} {attack:<10} acc {row[attack]:.3f}  "
                        f"({s['model_versions']} versions, {s['malicious_agents']} malicious, "
                        f"robust {s['robust_counters']}, {time.monotonic() - t0:.0f} s)",
                        flush=True,
                    )
                results[rule][str(fraction)] = row
    finally:
        await asyncio.to_thread(broker.cleanup)
    return results


def markdown(results: dict[str, dict[str, dict[str, float]]], attacks: list[str], clean: float | None) -> str:
    head = "| rule | f | clean | " + " | ".join(attacks) + " |"
    lines = [head, "|" + "---|" * (3 + len(attacks))]
    for rule, rows in results.items():
        for fraction, row in rows.items():
            if "clean" in row:
                cells = [f"{row['clean']:.3f}"] + [""] * len(attacks)
            else:
                cells = [""] + [_cell(row.get(a), clean) for a in attacks]
            lines.append(f"| {rule} | {fraction} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(acc: float | None, clean: float | None) -> str:
    if acc is None:
        return "-"
    if clean is None:
        return f"{acc:.3f}"
    mark = "" if acc >= clean - 0.05 else " ✗"
    return f"{acc:.3f}{mark}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", type=int, default=50)
    p.add_argument("--duration", type=float, default=10.0, help="seconds per cell (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rules", type=lambda s: s.split(","), default=list(RULES))
    p.add_argument("--attacks", type=lambda s: s.split(","), default=list(ATTACKS))
    p.add_argument("--fractions", type=lambda s: [float(x) for x in s.split(",")], default=[0.0, 0.1, 0.2, 0.3])
    p.add_argument(
        "--dp",
        action="store_true",
        help="agents clip to 1 and add Gaussian noise z = 0.5; the aggregator rejects updates that do not fit it",
    )
    p.add_argument("--conform", action="store_true", help="with --dp: attackers disguise updates to pass that check")
    p.add_argument(
        "--rate-limit",
        type=float,
        default=None,
        help="updates/s per agent (default: the simulator's 20, 2x the median)",
    )
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--markdown", metavar="PATH")
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)  # rejections are counted in each cell's summary
    t0 = time.monotonic()
    results = asyncio.run(run_matrix(args))
    clean = results.get("none", {}).get("0.0", {}).get("clean")
    table = markdown(results, args.attacks, clean)
    print(
        f"\nfinal test accuracy, {args.agents} agents, {args.duration:.0f} s per cell, DP {'on' if args.dp else 'off'}"
    )
    if clean is not None:
        print(f"clean plain FedBuff: {clean:.3f}; ✗ marks a cell more than 5 points below it")
    print(table)
    print(f"\n{sum(len(r) for rows in results.values() for r in rows.values())} runs in {time.monotonic() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")


if __name__ == "__main__":
    main()
