"""Codec speed: fedmq's msgpack tensor codec against pickle and Flower.

Updates of 100K, 1M and 10M float32 parameters split over 8 tensors; median of repeated
runs; ratios are fedmq time / baseline time (lower is better, 1.0 is parity).

* the copy-bound floor: encoding, ``pickle.dumps(protocol=5)`` of the same tensors (in-band:
  one copy of every tensor into one buffer); decoding, copying every tensor's bytes out of
  the payload into its own array, which is the work ``pickle.loads`` does for in-band
  arrays. Nothing here unpickles: the project never loads a pickle, benchmarks included.
* Flower, when ``flwr`` is importable: ``ndarrays_to_parameters`` / ``parameters_to_ndarrays``
  on the same tensors (Flower's per-tensor ``np.save`` bytes; it never builds one buffer, the
  gRPC layer serializes later). Install it only in the benchmark's environment, e.g.
  ``python -m venv /tmp/flwr && /tmp/flwr/bin/pip install flwr numpy msgpack`` and run
  ``PYTHONPATH=. /tmp/flwr/bin/python benchmarks/codec.py``.

Targets (issue 5): at most 1.5x the floor's time and at most 0.5x Flower's, on both sides.
fedmq's decode includes the full validation (schema, dtype, shape, finiteness).

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


def copy_out(payload: bytes, spans: list[tuple[int, int]]) -> list[np.ndarray]:
    """The decode floor: one copy of each tensor's bytes out of the received payload."""
    view = memoryview(payload)
    return [np.frombuffer(view[a:b], dtype=np.float32).copy() for a, b in spans]


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


def _flower() -> tuple[Callable[..., object], Callable[..., object]] | None:
    try:
        from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    except ImportError:
        return None
    return ndarrays_to_parameters, parameters_to_ndarrays


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=30)
    args = ap.parse_args()
    flower = _flower()
    cols = ["params", "MB", "side", "fedmq", "floor", "/floor", "ok<=1.5"]
    if flower is not None:
        cols += ["flower", "/flower", "ok<=0.5"]
    print(f"(ms, median of {args.repeat}; ratio = fedmq / baseline)")
    print(" ".join(f"{c:>10}" for c in cols))
    if flower is None:
        print("(flwr not importable: Flower columns left out)")
    for total in (100_000, 1_000_000, 10_000_000):
        t = tensors(total)
        msg = UpdateMessage(agent_id="bench", seq=1, base_version=0, num_examples=1, delta=t)
        wire = msg.to_bytes()
        spans = []
        for arr in t.values():
            start = wire.find(arr.tobytes()[:64])
            spans.append((start, start + arr.nbytes))
        ours = {
            "encode": median_ms(msg.to_bytes, args.repeat),
            "decode": median_ms(lambda w=wire: UpdateMessage.from_bytes(w), args.repeat),
        }
        base = {
            "encode": median_ms(lambda t=t: pickle.dumps(t, protocol=5), args.repeat),
            "decode": median_ms(lambda w=wire, s=spans: copy_out(w, s), args.repeat),
        }
        fl: dict[str, float] = {}
        if flower is not None:
            to_params, from_params = flower
            arrays = list(t.values())
            params = to_params(arrays)
            fl["encode"] = median_ms(lambda a=arrays, f=to_params: f(a), args.repeat)
            fl["decode"] = median_ms(lambda p=params, f=from_params: f(p), args.repeat)
        for side in ("encode", "decode"):
            r = ours[side] / base[side]
            row = [f"{total:,}", f"{len(wire) / 1e6:.1f}", side, f"{ours[side]:.3f}", f"{base[side]:.3f}", f"{r:.2f}"]
            row.append("yes" if r <= 1.5 else "NO")
            if fl:
                rf = ours[side] / fl[side]
                row += [f"{fl[side]:.3f}", f"{rf:.2f}", "yes" if rf <= 0.5 else "NO"]
            print(" ".join(f"{c:>10}" for c in row))
    print("fedmq encode copies each tensor once, into the message; decode copies nothing (views of the payload)")
    print("and checks schema, dtype, shape and finiteness (one read of the data).")


if __name__ == "__main__":
    main()
