"""Codec speed: fedmq's msgpack tensor codec against the copy-bound floors.

Updates of 100K, 1M and 10M float32 parameters split over 8 tensors; median of repeated
runs; ratios are fedmq time / baseline time (lower is better, 1.0 is parity).

* encode baseline: ``pickle.dumps(protocol=5)`` of the same tensors (one copy into a buffer);
* decode baseline: copying each tensor's bytes out of the payload with numpy (what any
  decoder must at least touch). Nothing here unpickles: fedmq never does, outside tests.
* Flower, when ``flwr`` is importable: ``ndarrays_to_parameters`` / ``parameters_to_ndarrays``
  on the same tensors (Flower's per-tensor ``np.save`` bytes; it never builds one buffer, the
  gRPC layer serializes later). Install it only in the benchmark's environment, e.g.
  ``python -m venv /tmp/flwr && /tmp/flwr/bin/pip install flwr numpy msgpack`` and run
  ``PYTHONPATH=. /tmp/flwr/bin/python benchmarks/codec.py``.

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


def copy_out(payload: bytes, spans: list[tuple[int, int]]) -> list[np.ndarray]:
    """The decode floor: one copy of each tensor's bytes out of the received payload."""
    view = memoryview(payload)
    return [np.frombuffer(view[a:b], dtype=np.float32).copy() for a, b in spans]


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
    head = (
        f"{'params':>10} {'MB':>6} | {'fedmq enc':>9} {'pickle enc':>10} {'ratio':>6} | "
        f"{'fedmq dec':>9} {'copy floor':>10} {'ratio':>6}"
    )
    if flower is not None:
        head += f" | {'flower enc':>10} {'fedmq/fl':>8} | {'flower dec':>10} {'fedmq/fl':>8}"
    print(head + f"   (ms, median of {args.repeat})")
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
        enc = median_ms(msg.to_bytes, args.repeat)
        penc = median_ms(lambda t=t: pickle.dumps(t, protocol=5), args.repeat)
        dec = median_ms(lambda w=wire: UpdateMessage.from_bytes(w), args.repeat)
        floor = median_ms(lambda w=wire, s=spans: copy_out(w, s), args.repeat)
        row = (
            f"{total:>10,} {len(wire) / 1e6:6.1f} | {enc:9.3f} {penc:10.3f} {enc / penc:6.2f} | "
            f"{dec:9.3f} {floor:10.3f} {dec / floor:6.2f}"
        )
        if flower is not None:
            to_params, from_params = flower
            arrays = list(t.values())
            params = to_params(arrays)
            fenc = median_ms(lambda a=arrays, f=to_params: f(a), args.repeat)
            fdec = median_ms(lambda p=params, f=from_params: f(p), args.repeat)
            row += f" | {fenc:10.3f} {enc / fenc:8.2f} | {fdec:10.3f} {dec / fdec:8.2f}"
        print(row)
    print("fedmq decode: msgpack copies each tensor once while parsing (as the floor does), then dtype, shape and")
    print("finiteness are checked (one more pass); the arrays are views of the parsed bytes, not further copies.")


if __name__ == "__main__":
    main()
