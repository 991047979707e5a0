"""Privacy against utility: no DP, local DP, central DP and distributed DP, side by side, per fleet size.

    python benchmarks/privacy_utility.py [--devices 100,1000] [--epsilon 8] [--sweep 2,4,16]
                                         [--json results.json] [--plot docs/privacy_utility.png]

Each fleet is the speech task's households (generated with espeak-ng, cached), each device
training its own numpy MLP in :mod:`simulator.population` (virtual time, the product's own
FedBuff rule, clipping, noise and ring arithmetic; no broker, no masks, which cancel exactly).
Every mechanism runs the same schedule (:func:`simulator.population.for_fleet`): the same
participation cap, the same K, the same seeds. The noise is calibrated so that a device in
``releases`` sums has ``--epsilon`` at delta 1e-5; the table prints the largest epsilon any
device actually reached, the held-out accuracy, and its difference from no DP in points.

``--sweep`` adds runs at more epsilons (the plot's curve) at the largest fleet size.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from models.tasks import get_task
from simulator.population import MECHANISMS, PopulationResult, for_fleet, run_population

TRUST = {
    "none": "-",
    "local": "nobody",
    "central": "the aggregator",
    "distributed": "nobody (t honest uploads)",
}
ACCOUNTING = {
    "none": "-",
    "local": "RDP Gaussian z per release, composed, no sampling",
    "central": "RDP Gaussian z per release, composed, no sampling",
    "distributed": "RDP of the sum of t discrete Gaussians (KLS21 Prop. 14), composed, no sampling",
}


def row(r: PopulationResult, baseline: float) -> str:
    c = r.config
    noise = r.noise.get("noise_multiplier")
    z = f"{noise:.2f}" if noise is not None else "-"
    eps = f"{r.max_epsilon:.2f}" if c.mechanism != "none" else "inf"
    diff = 100 * (r.accuracy - baseline)
    return (
        f"{r.devices:>7} {c.mechanism:<12} {eps:>6} {z:>6} {r.accuracy:>8.4f} {diff:>+7.1f} "
        f"{r.steps:>6} {c.buffer:>5} {c.releases:>4} {r.seconds:>7.0f}  {TRUST[c.mechanism]}"
    )


HEADER = (
    f"{'devices':>7} {'mechanism':<12} {'eps':>6} {'z':>6} {'accuracy':>8} {'vs none':>7} "
    f"{'steps':>6} {'K':>5} {'cap':>4} {'seconds':>7}  trusted with the updates"
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", default="100,1000", help="fleet sizes, comma-separated (10000 takes ~15 min)")
    ap.add_argument("--epsilon", type=float, default=8.0, help="the target epsilon of every DP row")
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--mechanisms", default=",".join(MECHANISMS))
    ap.add_argument("--sweep", default="", help="more epsilons for the plot, at the largest fleet (e.g. 2,4,16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write every run (settings, curve, result) here")
    ap.add_argument("--plot", type=Path, help="accuracy against epsilon, as PNG (needs matplotlib)")
    args = ap.parse_args(argv)
    sizes = [int(x) for x in args.devices.split(",") if x]
    mechanisms = [m for m in args.mechanisms.split(",") if m]
    sweep = [float(x) for x in args.sweep.split(",") if x]
    task = get_task("speech")
    runs: list[PopulationResult] = []
    print(f"privacy/utility on task speech ({task.test_description}), delta {args.delta:g}", flush=True)
    print(HEADER, flush=True)
    for n in sizes:
        started = time.perf_counter()
        data, test = task.load(n, seed=args.seed)
        print(f"# {n} households loaded in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        baseline = math.nan
        for mech in mechanisms:
            cfg = for_fleet(n, mechanism=mech, epsilon=args.epsilon, delta=args.delta, seed=args.seed)
            r = run_population(cfg, data, test)
            runs.append(r)
            if mech == "none":
                baseline = r.accuracy
            print(row(r, baseline), flush=True)
        if n == max(sizes):
            for eps in sweep:
                for mech in [m for m in mechanisms if m != "none"]:
                    cfg = for_fleet(n, mechanism=mech, epsilon=eps, delta=args.delta, seed=args.seed)
                    r = run_population(cfg, data, test)
                    runs.append(r)
                    print(row(r, baseline), flush=True)
    print("\naccounting:")
    for m in mechanisms:
        print(f"  {m:<12} {ACCOUNTING[m]}")
    if args.json is not None:
        args.json.write_text(json.dumps([as_json(r) for r in runs], indent=1))
    if args.plot is not None:
        plot(runs, args.plot)
    return 0


def as_json(r: PopulationResult) -> dict[str, Any]:
    out = asdict(r)
    out["config"] = asdict(r.config)
    return out


def plot(runs: list[PopulationResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(r.devices for r in runs)
    at = [r for r in runs if r.devices == n]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for mech, style in (("local", "v-"), ("central", "s-"), ("distributed", "o-")):
        pts = sorted((r.max_epsilon, r.accuracy) for r in at if r.config.mechanism == mech)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{mech} DP")
    for r in at:
        if r.config.mechanism == "none":
            ax.axhline(r.accuracy, color="grey", ls="--", label="no DP")
            ax.axhline(r.accuracy - 0.05, color="grey", ls=":", label="no DP - 5 points")
    ax.set_xscale("log")
    ax.set_xlabel("epsilon of the most exposed device (delta 1e-5, no amplification)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(f"speech keywords, {n} households, {replace(at[0].config).releases} releases per device")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
