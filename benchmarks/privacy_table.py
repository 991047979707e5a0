"""Epsilon of one device under update-level (local) DP, from the same accountant the agent runs.

Rows: noise multiplier z; columns: releases per device; cells: epsilon at delta (RDP via
dp-accounting, add/remove of one device). Also prints the buffer size K at which the
averaged noise z / sqrt(K) matches the demo's (0.5 / sqrt(20) = 0.11), the level at which
the digits model still learns in the demo.

    python benchmarks/privacy_table.py [--delta 1e-5]
"""

from __future__ import annotations

import argparse
import math

from edge_agent.privacy import PrivacyAccountant

Z = (0.5, 1.0, 2.0, 3.0, 5.0)
RELEASES = (1, 5, 10, 20, 50, 220)
DEMO_NOISE = 0.5 / math.sqrt(20)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--delta", type=float, default=1e-5)
    args = ap.parse_args()
    print(f"epsilon per device at delta={args.delta:g}")
    print(f"{'z':>5} | " + " ".join(f"{r:>7}" for r in RELEASES) + " releases | K for demo-level noise")
    for z in Z:
        cells = []
        for r in RELEASES:
            acc = PrivacyAccountant(args.delta)
            acc.record(z, r)
            cells.append(f"{acc.epsilon():7.1f}")
        k = math.ceil((z / DEMO_NOISE) ** 2)
        print(f"{z:5.1f} | " + " ".join(cells) + f"          | K >= {k}")


if __name__ == "__main__":
    main()
