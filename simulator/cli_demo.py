"""``fedmq demo``: the one-command tour. A broker, the aggregator and a federation of devices.

``--task`` picks the example (:mod:`models.tasks`): ``digits`` (default, 20 devices),
``speech`` (100 smart-speaker households learning keywords from espeak-ng voices, scored on
held-out voices), ``hospitals`` (5 hospitals learning breast-cancer diagnosis) or
``hospitals-imaging`` (5 hospitals, synthetic cell images, the med-cnn with ``--torch``).

Defaults (see :class:`simulator.harness.SimConfig`): FedBuff with K=10 and server learning
rate 0.5, polynomial staleness weighting, every device clipping to L2 norm 1 and adding
Gaussian noise with multiplier 0.5, log-normal device speeds with a slow tenth, 30 seconds.
``--secure-aggregation`` runs the same federation with SecAgg+ cohorts instead (local DP off).
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from fedmq.config import DEFAULT_HTTP
from models.tasks import get_task
from simulator.cli_simulate import add_run_args, execute
from simulator.harness import SimConfig, for_task


def configure(p: argparse.ArgumentParser) -> None:
    """Add the command's arguments."""
    add_run_args(p, dashboard_default=DEFAULT_HTTP)
    p.add_argument(
        "--secure-aggregation",
        action="store_true",
        help="SecAgg+ cohorts: the aggregator learns only sums of updates (local DP off; see docs/security.md)",
    )
    p.add_argument(
        "--torch",
        action="store_true",
        help="train the task's torch CNN (speech-cnn, med-cnn, digits-cnn) instead of its numpy model",
    )


def demo_config(args: argparse.Namespace) -> SimConfig:
    """The demo's configuration for ``args.task``."""
    agents = args.agents if args.agents is not None else get_task(args.task).default_devices
    cfg = SimConfig(task=args.task, agents=agents, duration=args.duration, broker=args.broker, seed=args.seed)
    cfg = for_task(cfg, torch=args.torch)
    if args.secure_aggregation:
        extra = get_task(args.task).aggregator_settings(cfg.aggregator.model, secure=True)
        cfg = replace(
            cfg,
            aggregator=replace(cfg.aggregator, secure_aggregation=True, **extra),
            privacy=replace(cfg.privacy, enabled=False),
        )
    return cfg


def run(args: argparse.Namespace) -> int:
    """Run the demo."""
    cfg = demo_config(args)
    what = f"{cfg.agents} devices, task {cfg.task}, model {cfg.aggregator.model}"
    if args.secure_aggregation:
        execute(cfg, args, f"fedmq demo: FedBuff with secure aggregation, {what}")
        print(
            "\n  Privacy: the aggregator learned each cohort's sum and no device's update (SecAgg+, "
            "docs/security.md).\n  No DP noise was added, so the sums themselves are not differentially "
            "private: distributed DP is the next step."
        )
        return 0
    if not cfg.privacy.enabled:
        execute(cfg, args, f"fedmq demo: FedBuff, {what}, DP off")
        print(
            "\n  Privacy: no local DP noise in this example (docs/examples.md says why). Run it with "
            "--secure-aggregation\n  so that the aggregator sees no device's update, only sums; "
            "docs/hospitals.md walks through a deployment."
        )
        return 0
    s = execute(cfg, args, f"fedmq demo: FedBuff, {what}, local DP")
    eps = s.get("max_epsilon")
    if eps is not None:
        print(
            f"\n  Privacy: each device's updates are ({eps:.0f}, {s['delta']})-DP (RDP accountant, add/remove "
            "of one device). With devices that each release hundreds of\n  updates, noise that still lets "
            "the model learn gives a large epsilon; see README 'Privacy' for settings that reach single digits."
        )
    return 0
