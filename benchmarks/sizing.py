"""Sizing a fleet: the defaults against docs/operating.md's recommendation, for a few fleet sizes.

    python benchmarks/sizing.py [--agents 3,20,100] [--duration 180]

A user with three devices and the defaults (FedBuff K = 10, 5 s between local rounds, local DP
with z = 1.0, one local epoch at learning rate 0.1) saw 0.29 accuracy after 60 s. For each
fleet size this runs the digits task twice on a real Mosquitto, in one process
(simulator.harness): once with those defaults and once with ``RECOMMENDED``, both with a
device's round taking about 5 s (the ``round_interval`` of a real agent: simulated compute of
5 s, log-normal sigma 0.2). It prints held-out accuracy at 60 s, 180 s and the end, the number
of model versions, and each device's epsilon at the end (delta 1e-5), and the ratio of the
accuracy at 60 s to the defaults'.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

from fedmq.config import AggregatorConfig, PrivacyConfig, StalenessConfig
from simulator.harness import SimConfig, Stragglers, run_simulation

ROUND_SECONDS = 5.0

RECOMMENDED: dict[int, dict[str, float]] = {
    # devices: buffer K, noise z (clip 1), and the plan's local epochs and learning rate.
    # K about a fifth to a third of the fleet, at least 2; z small enough that the noise of a
    # K-mean (z C / sqrt(K) per coordinate) leaves signal; more local work per round when rounds are rare.
    3: {"buffer_size": 2, "noise_multiplier": 0.3, "local_epochs": 5, "lr": 0.3},
    20: {"buffer_size": 5, "noise_multiplier": 0.5, "local_epochs": 5, "lr": 0.3},
    100: {"buffer_size": 20, "noise_multiplier": 0.8, "local_epochs": 5, "lr": 0.3},
    1000: {"buffer_size": 100, "noise_multiplier": 1.0, "local_epochs": 5, "lr": 0.3},
}
DEFAULTS = {"buffer_size": 10, "noise_multiplier": 1.0, "local_epochs": 1, "lr": 0.1}
"""fedmq's defaults: aggregator.buffer_size, the simulator's z, agent.local_epochs and agent.lr."""


def config(agents: int, duration: float, knobs: dict[str, float], seed: int) -> SimConfig:
    """The digits task with ``knobs``, devices that take about ``ROUND_SECONDS`` per round."""
    k = int(knobs["buffer_size"])  # not capped at the fleet: FedBuff's patience admits a second update per device
    return SimConfig(
        agents=agents,
        task="digits",
        duration=duration,
        seed=seed,
        local_epochs=int(knobs["local_epochs"]),
        batch_size=16,
        lr=knobs["lr"],
        stragglers=Stragglers(median=ROUND_SECONDS, sigma=0.2, slow_fraction=0.0, slow_factor=1.0),
        aggregator=AggregatorConfig(
            rule="fedbuff",
            buffer_size=k,
            server_lr=1.0,
            eval_every=1,
            metrics_interval=1.0,
            staleness=StalenessConfig("polynomial", 0.5),
            max_staleness=20,
            rate_limit=0,
        ),
        privacy=PrivacyConfig(clip_norm=1.0, noise_multiplier=knobs["noise_multiplier"]),
    )


def accuracy_at(summary: dict[str, Any], t: float) -> float | None:
    """Accuracy of the newest version evaluated by ``t`` seconds."""
    best = None
    for elapsed, _version, acc in summary.get("accuracy_history") or []:
        if elapsed <= t:
            best = acc
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", default="3,20,100")
    ap.add_argument("--duration", type=float, default=180.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(f"digits, a local round every ~{ROUND_SECONDS:g} s per device, clip 1, delta 1e-5, seed {args.seed}")
    print(
        f"{'devices':>7} {'settings':<12} {'K':>4} {'z':>5} {'E':>2} {'lr':>4} {'acc@60s':>8} {'acc@180s':>9} "
        f"{'acc end':>8} {'versions':>8} {'epsilon':>8} {'ratio acc@60s':>13}"
    )
    for n in (int(x) for x in args.agents.split(",")):
        results = []
        for name, knobs in (("defaults", DEFAULTS), ("recommended", RECOMMENDED[n])):
            cfg = config(n, args.duration, knobs, args.seed)
            summary = asyncio.run(run_simulation(cfg))
            results.append((name, cfg, summary))
        base = accuracy_at(results[0][2], 60.0) or 0.0
        for name, cfg, s in results:
            a60 = accuracy_at(s, 60.0)
            a180 = accuracy_at(s, 180.0)
            ratio = f"{a60 / base:.2f}" if a60 is not None and base else "-"
            eps = s.get("max_epsilon")
            print(
                f"{n:>7} {name:<12} {cfg.aggregator.buffer_size:>4} {cfg.privacy.noise_multiplier:>5.2f} "
                f"{cfg.local_epochs:>2} {cfg.lr:>4.2f} "
                f"{_f(a60):>8} {_f(a180):>9} {_f(s.get('final_accuracy')):>8} {s.get('model_versions'):>8} "
                f"{_f(eps, 1):>8} {ratio:>13}",
                flush=True,
            )


def _f(x: Any, digits: int = 3) -> str:
    return "-" if x is None else f"{float(x):.{digits}f}"


if __name__ == "__main__":
    main()
