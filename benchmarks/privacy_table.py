"""Epsilon of one device under update-level (local) DP, from the same accountant the agent runs.

Rows: noise multiplier z; columns: releases per device; cells: epsilon at delta (RDP via
dp-accounting, add/remove of one device). Also prints the buffer size K at which the
averaged noise z / sqrt(K) matches the demo's (z = 0.5 over a buffer of K = 10: 0.16), the
level at which the digits model still learns in the demo. Both are read from the simulator's
defaults, which `fedmq demo` runs.

    python benchmarks/privacy_table.py [--delta 1e-5]
"""

from __future__ import annotations

import argparse
import math

from edge_agent.privacy import PrivacyAccountant
from simulator.harness import SimConfig

Z = (0.5, 1.0, 2.0, 3.0, 5.0)
RELEASES = (1, 5, 10, 20, 50, 230)
_DEMO = SimConfig()
DEMO_Z, DEMO_K = _DEMO.privacy.noise_multiplier, _DEMO.aggregator.buffer_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--delta", type=float, default=1e-5)
    args = ap.parse_args()
    print(f"epsilon per device at delta={args.delta:g}; demo-level noise: z = {DEMO_Z} over K = {DEMO_K}")
    print(f"{'z':>5} | " + " ".join(f"{r:>7}" for r in RELEASES) + " releases | K for demo-level noise")
    for z in Z:
        cells = []
        for r in RELEASES:
            acc = PrivacyAccountant(args.delta)
            acc.record(z, r)
            cells.append(f"{acc.epsilon():7.1f}")
        k = math.ceil(DEMO_K * (z / DEMO_Z) ** 2 - 1e-9)  # z / sqrt(K) <= DEMO_Z / sqrt(DEMO_K)
        print(f"{z:5.1f} | " + " ".join(cells) + f"          | K >= {k}")


if __name__ == "__main__":
    main()
