"""The examples' time to accuracy: FedBuff against synchronous FedAvg, per task, same devices.

    python benchmarks/tasks.py [--tasks speech,hospitals,hospitals-imaging,digits] [--cap 120] [--torch]

Each task runs as ``fedmq demo --task`` runs it (:func:`simulator.harness.for_task`: the task's
devices, model, recipe and FedBuff K, the demo's stragglers), twice on one real Mosquitto:
once with FedBuff and once with sync FedAvg over all devices, the baseline (Flower's kind of
rounds, which wait for the slowest device). Each run stops at the task's target accuracy or
after ``--cap`` seconds, then the held-out test accuracy is read (speech: on held-out voices).

The table prints seconds to the target for both, FedAvg's time over FedBuff's (the speed-up),
and the final accuracies. ``--torch`` trains each task's torch model instead (speech-cnn,
med-cnn, digits-cnn).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from models.tasks import TASKS, get_task
from simulator.harness import SimConfig, for_task, run_simulation
from simulator.report import time_to_accuracy


def runs(task: str, args: argparse.Namespace) -> dict[str, SimConfig]:
    t = get_task(task)
    base = for_task(SimConfig(task=task, agents=t.default_devices, duration=args.cap, seed=args.seed), torch=args.torch)
    agg = replace(base.aggregator, target_accuracy=t.target_accuracy)
    return {
        "fedbuff": replace(base, aggregator=replace(agg, rule="fedbuff")),
        "fedavg (sync)": replace(base, aggregator=replace(agg, rule="fedavg", sync_agents=0)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="speech,hospitals,hospitals-imaging,digits")
    ap.add_argument("--cap", type=float, default=120.0, help="seconds per run at most")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--torch", action="store_true", help="the tasks' torch models")
    ap.add_argument("--json", default=None, help="write every run's summary here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    tasks = [x.strip() for x in args.tasks.split(",") if x.strip()]
    unknown = [x for x in tasks if x not in TASKS]
    if unknown:
        ap.error(f"unknown tasks {unknown}; known: {', '.join(TASKS)}")
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for task in tasks:
        results[task] = {}
        for label, cfg in runs(task, args).items():
            s = asyncio.run(run_simulation(cfg))
            results[task][label] = s
            print(f"  {task} / {label}: {s['wall_seconds']} s, final {s.get('final_accuracy') or 0:.3f}", flush=True)
    print(f"\ntime to each task's target accuracy, FedBuff vs sync FedAvg (cap {args.cap:.0f} s, seed {args.seed})")
    head = (
        f"{'task':<18} {'model':<10} {'devices':>7} {'target':>6} {'fedbuff s':>9} {'fedavg s':>9} "
        f"{'speed-up':>8} {'final fedbuff':>13} {'final fedavg':>12}"
    )
    print(head)
    print("-" * len(head))
    for task, pair in results.items():
        t = get_task(task)
        fb, fa = pair["fedbuff"], pair["fedavg (sync)"]
        t_fb, t_fa = time_to_accuracy(fb, t.target_accuracy), time_to_accuracy(fa, t.target_accuracy)
        ratio = f"{t_fa / t_fb:.2f}x" if (t_fb and t_fa) else ("-" if not t_fb else f">{args.cap / t_fb:.1f}x")
        print(
            f"{task:<18} {fb['model']:<10} {fb['agents']:>7} {t.target_accuracy:>6.2f} "
            f"{_secs(t_fb, args.cap):>9} {_secs(t_fa, args.cap):>9} {ratio:>8} "
            f"{fb.get('final_accuracy') or 0:>13.3f} {fa.get('final_accuracy') or 0:>12.3f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


def _secs(t: float | None, cap: float) -> str:
    return f"{t:.1f}" if t is not None else f">{cap:.0f}"


if __name__ == "__main__":
    main()
