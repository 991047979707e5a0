"""``fedmq population``: privacy against utility for a fleet of thousands, in virtual time, in minutes.

Every device trains its numpy model on its own data; the mechanisms are the product's own code
(:mod:`simulator.population`). No broker: for the protocol over MQTT, use ``fedmq simulate``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from fedmq.errors import ConfigError
from simulator.population import MECHANISMS, PopulationConfig, for_fleet, run_population


def configure(p: argparse.ArgumentParser) -> None:
    """Add the command's arguments."""
    p.add_argument("--task", default="speech", help="speech (espeak-ng households) or digits (default speech)")
    p.add_argument("--devices", type=int, default=1000, help="fleet size (default 1000)")
    p.add_argument("--mechanism", choices=MECHANISMS, default="distributed", help="default: distributed")
    p.add_argument("--json", metavar="PATH", help="write the result (settings, curve) as JSON")
    defaults = PopulationConfig()
    for f in fields(PopulationConfig):
        if f.name in ("mechanism",):
            continue
        p.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f"pop_{f.name}",
            type=type(getattr(defaults, f.name)),
            default=None,
            help=f"default: the fleet preset's (for_fleet), else {getattr(defaults, f.name)!r}",
        )


def run(args: argparse.Namespace) -> int:
    """Load the fleet, run it, print the result."""
    from models.tasks import get_task

    overrides: dict[str, Any] = {k[4:]: v for k, v in vars(args).items() if k.startswith("pop_") and v is not None}
    try:
        cfg = for_fleet(args.devices, mechanism=args.mechanism, **overrides).validate()
        data, test = get_task(args.task).load(args.devices, seed=cfg.seed)
    except ValueError as exc:
        raise ConfigError("--devices" if "device" in str(exc) else "population", str(exc)) from None

    def progress(step: int, accuracy: float) -> None:
        print(f"\rstep {step:>5}  accuracy {accuracy:.4f}", end="", file=sys.stderr, flush=True)

    r = run_population(cfg, data, test, progress=progress)
    print(file=sys.stderr)
    eps = f"{r.max_epsilon:.3f} at delta {cfg.delta:g}" if cfg.mechanism != "none" else "no DP"
    print(f"fedmq population: {args.devices} devices, task {args.task}, mechanism {cfg.mechanism}")
    for name, value in (
        ("final test accuracy", f"{r.accuracy:.4f} (best {r.best_accuracy:.4f})"),
        ("max epsilon (per device)", eps),
        ("noise", ", ".join(f"{k} {v:.4g}" for k, v in r.noise.items()) or "-"),
        ("server steps", f"{r.steps} of K = {cfg.buffer}"),
        ("contributions", f"{r.contributions} (cap {cfg.releases} per device; {r.dropped_stale} too stale)"),
        ("mean staleness", f"{r.mean_staleness:.2f}"),
        ("seconds", f"{r.seconds:.0f}"),
    ):
        print(f"  {name:<26} {value}")
    if args.json:
        out = asdict(r)
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0
