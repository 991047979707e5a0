"""``fedmq demo``: the one-command tour. A broker, the aggregator and 20 agents on digits.

Defaults (see :class:`simulator.harness.SimConfig`): FedBuff with K=20 and server learning
rate 0.5, polynomial staleness weighting, Dirichlet(0.5) non-IID split, every agent clipping
to L2 norm 1 and adding Gaussian noise with multiplier 0.5, log-normal device speeds with a
slow tenth, 30 seconds. ``--secure-aggregation`` runs the same federation with SecAgg+ cohorts
instead (local DP off).
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from simulator.cli_simulate import add_run_args, execute
from simulator.harness import SimConfig


def configure(p: argparse.ArgumentParser) -> None:
    """Add the command's arguments."""
    add_run_args(p)
    p.add_argument(
        "--secure-aggregation",
        action="store_true",
        help="SecAgg+ cohorts: the aggregator learns only sums of updates (local DP off; see docs/security.md)",
    )


def run(args: argparse.Namespace) -> int:
    """Run the demo."""
    cfg = SimConfig(agents=args.agents, duration=args.duration, broker=args.broker, seed=args.seed)
    if args.secure_aggregation:
        cfg = replace(
            cfg,
            aggregator=replace(cfg.aggregator, secure_aggregation=True),
            privacy=replace(cfg.privacy, enabled=False),
        )
        execute(cfg, args, f"fedmq demo: FedBuff with secure aggregation, {cfg.agents} agents, digits")
        print(
            "\n  Privacy: the aggregator learned each cohort's sum and no device's update (SecAgg+, "
            "docs/security.md).\n  No DP noise was added, so the sums themselves are not differentially "
            "private: distributed DP is the next step."
        )
        return 0
    s = execute(cfg, args, f"fedmq demo: FedBuff, {cfg.agents} agents, digits, local DP")
    eps = s.get("max_epsilon")
    if eps is not None:
        print(
            f"\n  Privacy: each agent's updates are ({eps:.0f}, {s['delta']})-DP (RDP accountant, add/remove "
            "of one device). With 20 devices that each release hundreds of\n  updates, noise that still lets "
            "the model learn gives a large epsilon; see README 'Privacy' for settings that reach single digits."
        )
    return 0
