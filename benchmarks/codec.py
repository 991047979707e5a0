"""Codec speed: fedmq's msgpack tensor codec against pickle (protocol 5, the copy-bound floor).

Updates of 100K, 1M and 10M float32 parameters split over 8 tensors; median of repeated
runs. Prints a table with ratios (fedmq time / pickle time: lower is better, 1.0 is parity).

    python benchmarks/codec.py [--repeat 30]
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import time
from collections.abc import Callable

import numpy as np

from fedmq.messages import UpdateMessage


def tensors(total: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    sizes = [total // 8] * 7 + [total - 7 * (total // 8)]
    return {f"layer{i}": rng.standard_normal(n).astype(np.float32) for i, n in enumerate(sizes)}


def median_ms(fn: Callable[[], object], repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=30)
    args = ap.parse_args()
    print(
        f"{'params':>10} {'MB':>6} | {'fedmq enc':>9} {'pickle enc':>10} {'ratio':>6} | "
        f"{'fedmq dec':>9} {'pickle dec':>10} {'ratio':>6}   (ms, median of {args.repeat})"
    )
    for total in (100_000, 1_000_000, 10_000_000):
        t = tensors(total)
        msg = UpdateMessage(agent_id="bench", seq=1, base_version=0, num_examples=1, delta=t)
        wire = msg.to_bytes()
        pk = pickle.dumps(t, protocol=5)
        enc = median_ms(msg.to_bytes, args.repeat)
        penc = median_ms(lambda t=t: pickle.dumps(t, protocol=5), args.repeat)
        dec = median_ms(lambda w=wire: UpdateMessage.from_bytes(w), args.repeat)  # includes validation + finite check
        pdec = median_ms(
            lambda p=pk: pickle.loads(p), args.repeat
        )  # baseline only: bytes this script just pickled itself
        print(
            f"{total:>10,} {len(wire) / 1e6:6.1f} | {enc:9.3f} {penc:10.3f} {enc / penc:6.2f} | "
            f"{dec:9.3f} {pdec:10.3f} {dec / pdec:6.2f}"
        )
    print("fedmq decode validates dtype, shape and finiteness (a full pass over the data); pickle checks nothing.")


if __name__ == "__main__":
    main()
