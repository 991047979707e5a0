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
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from models.tasks import get_task
from simulator.population import MECHANISMS, PopulationConfig, PopulationResult, for_fleet, run_population

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


def row(n: int, mech: str, eps_target: float, rs: list[PopulationResult], baseline: float) -> str:
    c = rs[0].config
    acc = statistics.fmean(r.accuracy for r in rs)
    spread = max(r.accuracy for r in rs) - min(r.accuracy for r in rs)
    noise = rs[0].noise.get("noise_multiplier")
    z = f"{noise:.2f}" if noise is not None else "-"
    eps = f"{max(r.max_epsilon for r in rs):.2f}" if mech != "none" else "inf"
    diff = 100 * (acc - baseline)
    seconds = statistics.fmean(r.seconds for r in rs)
    return (
        f"{n:>7} {mech:<12} {eps:>6} {z:>6} {acc:>8.4f} {spread:>7.4f} {diff:>+7.1f} "
        f"{rs[0].steps:>6} {c.buffer:>5} {c.releases:>4} {seconds:>7.0f}  {TRUST[mech]}"
    )


HEADER = (
    f"{'devices':>7} {'mechanism':<12} {'eps':>6} {'z':>6} {'accuracy':>8} {'spread':>7} {'vs none':>7} "
    f"{'steps':>6} {'K':>5} {'cap':>4} {'seconds':>7}  trusted with the updates"
)


def job(n: int, mech: str, epsilon: float, delta: float, seed: int) -> PopulationResult:
    """One run (in a worker process): the fleet's households come from the feature cache."""
    data, test = get_task("speech").load(n, seed=0)
    cfg = for_fleet(n, mechanism=mech, epsilon=epsilon, delta=delta, seed=seed)
    return run_population(cfg, data, test)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", default="100,1000", help="fleet sizes, comma-separated (10000 takes ~15 min)")
    ap.add_argument("--epsilon", type=float, default=8.0, help="the target epsilon of every DP row")
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--mechanisms", default=",".join(MECHANISMS))
    ap.add_argument("--sweep", default="", help="more epsilons for the plot, at the largest fleet (e.g. 2,4,16)")
    ap.add_argument("--seeds", type=int, default=1, help="runs per row (schedule, noise, init); the mean is shown")
    ap.add_argument("--sweep-seeds", type=int, default=1, help="runs per sweep point (default 1)")
    ap.add_argument("--workers", type=int, default=1, help="runs at once, in processes")
    ap.add_argument("--json", type=Path, help="write every run (settings, curve, result) here")
    ap.add_argument("--plot", type=Path, help="accuracy against epsilon, as PNG (needs matplotlib)")
    ap.add_argument("--from-json", type=Path, help="no runs: plot the runs a --json file holds")
    args = ap.parse_args(argv)
    if args.from_json is not None:
        if args.plot is None:
            ap.error("--from-json needs --plot")
        plot([from_json(d) for d in json.loads(args.from_json.read_text())], args.plot)
        return 0
    sizes = [int(x) for x in args.devices.split(",") if x]
    mechanisms = [m for m in args.mechanisms.split(",") if m]
    sweep = [float(x) for x in args.sweep.split(",") if x]
    task = get_task("speech")
    for n in sizes:  # generate (or find cached) the households once, before the workers read them
        started = time.perf_counter()
        task.load(n, seed=0)
        print(f"# {n} households ready in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    rows = [(n, m, args.epsilon) for n in sizes for m in mechanisms]
    rows += [(max(sizes), m, e) for e in sweep for m in mechanisms if m != "none"]
    print(f"privacy/utility on task speech ({task.test_description}), delta {args.delta:g}", flush=True)
    print(f"mean over {args.seeds} seed(s) ({args.sweep_seeds} for the sweep); spread = max - min", flush=True)
    print(HEADER, flush=True)
    results: dict[tuple[int, str, float], list[PopulationResult]] = {}
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = {
            key: [
                pool.submit(job, *key, args.delta, seed)
                for seed in range(args.seeds if key[2] == args.epsilon else args.sweep_seeds)
            ]
            for key in rows
        }
        baseline: dict[int, float] = {}
        for key, fs in futures.items():
            rs = results[key] = [f.result() for f in fs]
            n, mech, eps = key
            if mech == "none":
                baseline[n] = statistics.fmean(r.accuracy for r in rs)
            print(row(n, mech, eps, rs, baseline.get(n, math.nan)), flush=True)
    print("\naccounting:")
    for m in mechanisms:
        print(f"  {m:<12} {ACCOUNTING[m]}")
    runs = [r for rs in results.values() for r in rs]
    if args.json is not None:
        args.json.write_text(json.dumps([as_json(r) for r in runs], indent=1))
    if args.plot is not None:
        plot(runs, args.plot)
    return 0


def as_json(r: PopulationResult) -> dict[str, Any]:
    out = asdict(r)
    out["config"] = asdict(r.config)
    return out


def from_json(d: dict[str, Any]) -> PopulationResult:
    """Inverse of :func:`as_json`."""
    fields = dict(d)
    fields["config"] = PopulationConfig(**fields["config"])
    fields["curve"] = [tuple(p) for p in fields["curve"]]
    return PopulationResult(**fields)


def plot(runs: list[PopulationResult], path: Path) -> None:
    """Mean accuracy against the reached epsilon, per mechanism, at the largest fleet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(r.devices for r in runs)
    at = [r for r in runs if r.devices == n]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for mech, style in (("local", "v-"), ("central", "s-"), ("distributed", "o-")):
        groups: dict[float, list[PopulationResult]] = {}
        for r in at:
            if r.config.mechanism == mech:
                groups.setdefault(r.config.epsilon, []).append(r)
        pts = sorted((max(r.max_epsilon for r in g), statistics.fmean(r.accuracy for r in g)) for g in groups.values())
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{mech} DP")
    none = [r.accuracy for r in at if r.config.mechanism == "none"]
    if none:
        ax.axhline(statistics.fmean(none), color="grey", ls="--", label="no DP")
        ax.axhline(statistics.fmean(none) - 0.05, color="grey", ls=":", label="no DP - 5 points")
    ax.set_xscale("log")
    ticks = sorted({round(r.config.epsilon, 3) for r in at if r.config.mechanism != "none"})
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("epsilon of the most exposed device (delta 1e-5, no amplification)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(f"speech keywords, {n} households, at most {at[0].config.releases} sums per device")
    ax.legend(loc="center right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
