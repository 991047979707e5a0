"""Secure aggregation against plain FedBuff: per-device cost, the aggregator's unmasking, time to accuracy.

    python benchmarks/secagg.py [--k 10,100] [--params 10000,1000000] [--tta-agents 40] [--tta-k 20]

**Protocol costs** (in one process, no broker: CPU and bytes, not network time). For each
cohort size K and model size, one cohort of ``ceil(1.2 K)`` devices runs the whole protocol
(SecAgg+ graph of degree ``auto_degree``, threshold 0.6 of the holders, the last 20% to upload
counting as dropouts, as the overselection intends) and one plain FedBuff buffer of K updates
is encoded, decoded and stepped. Per device: CPU seconds of its protocol work (key agreement,
Shamir, AES-GCM, quantization, mask expansion, encoding) against encoding one plain float32
update; bytes it sends and receives in protocol messages against one update and its receipt
(the model download is the same in both and left out). Aggregator: the unmasking (share
reconstruction and mask removal) against decoding and averaging the K plain updates.

**Time to accuracy**: ``fedmq simulate`` on digits, ``--tta-agents`` devices with stragglers
(``--median`` seconds per local round: 0.1 is the simulator's default, 1.0 closer to a small
device),
K = ``--tta-k``, no DP in either run (the comparison is of the protocol, not of the noise), a
real Mosquitto; wall-clock seconds to ``--target`` test accuracy with and without secure
aggregation. The issue's target: within 2x of plain FedBuff at K = 20.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from aggregator.rules.fedbuff import fedbuff_step
from fedmq.config import SecAggConfig
from fedmq.messages import ReceiptMessage, UpdateMessage
from fedmq.secagg.client import ClientSession, NeedInput, Send, weighted_input
from fedmq.secagg.messages import CheckIn, CohortMsg, decode_down, decode_up
from fedmq.secagg.server import CohortManager, Reject, SecAggSettings, SendTo, Unmasked
from simulator.harness import SimConfig, Stragglers, run_simulation
from simulator.report import time_to_accuracy


@dataclass
class Cost:
    device_cpu: float
    device_sent: float
    device_received: float
    server: float


def tensors(params: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A model of ``params`` float32 values in two tensors."""
    bias = min(1000, params // 10)
    return {
        "w": rng.normal(0, 0.01, params - bias).astype(np.float32),
        "b": rng.normal(0, 0.01, bias).astype(np.float32),
    }


def secagg_cohort(k: int, params: int, seed: int = 0) -> Cost:
    """One cohort end to end in memory; per-device and aggregator costs."""
    rng = np.random.default_rng(seed)
    settings = SecAggSettings(cohort_size=k, overselect=0.2, threshold=0.6, timeout=60.0)
    n = settings.members
    manager = CohortManager(settings, n_values=params + 1)
    agents = [f"d{i:03d}" for i in range(n)]
    delta = tensors(params, rng)
    cpu = dict.fromkeys(agents, 0.0)
    sent = dict.fromkeys(agents, 0)
    received = dict.fromkeys(agents, 0)
    sessions: dict[str, ClientSession] = {}
    queue: deque[tuple[str, bytes]] = deque()
    server_unmask = 0.0
    upload_order = list(agents)  # the first K upload in time; the rest arrive late (dropouts)

    def to_server(agent: str, payload: bytes) -> None:
        nonlocal server_unmask
        sent[agent] += len(payload)
        msg = decode_up(payload)
        t0 = time.perf_counter()
        outs = (
            manager.check_in(agent, msg, 0.0, version=0, run=None)
            if isinstance(msg, CheckIn)
            else manager.receive(agent, msg, 0.0)
        )
        took = time.perf_counter() - t0
        if any(isinstance(o, Unmasked) for o in outs):
            server_unmask += took
        for o in outs:
            if isinstance(o, SendTo):
                queue.append((o.agent, o.message.to_bytes()))
            elif isinstance(o, Reject) and o.reason.value != "late_upload":
                raise AssertionError(o)

    for a in agents:
        to_server(a, CheckIn(a).to_bytes())
    pending_inputs: list[str] = []
    uploaders = set(upload_order[:k])  # the others drop out after sharing: their masks are removed from the sum
    while queue or pending_inputs:
        if not queue:
            a = min(pending_inputs, key=upload_order.index)
            pending_inputs.remove(a)
            t0 = time.process_time()
            values = weighted_input(delta, clip_norm=1.0, weight=1.0)
            outs = sessions[a].provide_input(values, seq=1, base_version=0)
            payloads = [o.message.to_bytes() for o in outs if isinstance(o, Send)]
            cpu[a] += time.process_time() - t0
            for p in payloads:
                to_server(a, p)
            continue
        agent, payload = queue.popleft()
        received[agent] += len(payload)
        t0 = time.process_time()
        msg = decode_down(payload)
        if isinstance(msg, CohortMsg):
            sessions[agent] = ClientSession(agent, msg, now=0.0)
            outs = sessions[agent].start()
        else:
            outs = sessions[agent].handle(msg)
        payloads = [o.message.to_bytes() for o in outs if isinstance(o, Send)]
        cpu[agent] += time.process_time() - t0
        if any(isinstance(o, NeedInput) for o in outs) and agent in uploaders:
            pending_inputs.append(agent)
        for p in payloads:
            to_server(agent, p)
    assert manager.applied == 1, "the cohort did not complete"

    def mean(per: dict[str, Any]) -> float:  # over the devices that uploaded (the dropouts did less)
        return float(np.mean([per[a] for a in uploaders]))

    return Cost(mean(cpu), mean(sent), mean(received), server_unmask)


def plain_buffer(k: int, params: int, seed: int = 0) -> Cost:
    """K plain updates: each device encodes one; the aggregator decodes them and makes the FedBuff step."""
    rng = np.random.default_rng(seed)
    delta = tensors(params, rng)
    weights = {key: np.zeros_like(v) for key, v in delta.items()}
    t0 = time.process_time()
    payload = UpdateMessage("d000", 1, 0, 8, delta).to_bytes()
    device = time.process_time() - t0
    receipt = ReceiptMessage("d000", 1, "accepted", 1, index=1).to_bytes()
    t0 = time.perf_counter()
    updates = [UpdateMessage.from_bytes(payload).delta for _ in range(k)]
    fedbuff_step(weights, updates, [1.0] * k)
    server = time.perf_counter() - t0
    return Cost(device, len(payload), len(receipt), server)


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n}"


def protocol_table(ks: list[int], sizes: list[int]) -> None:
    print("protocol costs: one cohort of ceil(1.2 K) devices (the last 20% drop after sharing) vs one FedBuff buffer;")
    print("per device that uploaded, in protocol messages (the model download is the same in both)")
    head = (
        f"{'K':>4} {'params':>9} | {'device CPU ms':>24} | {'device sent':>26} | {'device received':>22} "
        f"| {'aggregator ms (unmask vs mean)':>32}"
    )
    print(head)
    print(f"{'':>4} {'':>9} | {'plain':>7} {'secagg':>8} {'ratio':>7} | {'plain':>8} {'secagg':>9} {'ratio':>7} "
          f"| {'plain':>6} {'secagg':>8} {'ratio':>6} | {'plain':>8} {'secagg':>10} {'ratio':>10}")  # fmt: skip
    for k in ks:
        for p in sizes:
            sa, pl = secagg_cohort(k, p), plain_buffer(k, p)
            cpu = f"{pl.device_cpu * 1e3:7.1f} {sa.device_cpu * 1e3:8.1f} {sa.device_cpu / pl.device_cpu:6.1f}x"
            out = f"{human(pl.device_sent):>8} {human(sa.device_sent):>9} {sa.device_sent / pl.device_sent:6.2f}x"
            back = f"{human(pl.device_received):>6} {human(sa.device_received):>8}"
            back += f" {sa.device_received / pl.device_received:5.0f}x"
            agg = f"{pl.server * 1e3:8.1f} {sa.server * 1e3:10.1f} {sa.server / pl.server:9.1f}x"
            print(f"{k:>4} {p:>9,} | {cpu} | {out} | {back} | {agg}", flush=True)


def tta(args: argparse.Namespace) -> None:
    rows: list[tuple[int, str, dict[str, Any]]] = []
    for seed in range(args.seed, args.seed + args.repeats):
        base = SimConfig(
            agents=args.tta_agents,
            duration=args.cap,
            seed=seed,
            stragglers=Stragglers(median=args.median, sigma=0.5, slow_fraction=0.1, slow_factor=5.0),
        )
        agg = replace(base.aggregator, buffer_size=args.tta_k, target_accuracy=args.target)
        off = replace(base.privacy, enabled=False)
        runs = {
            "fedbuff": replace(base, aggregator=agg, privacy=off),
            # the same clip (--secagg-clip) and weights (staleness only) as under secure aggregation
            "fedbuff clipped": replace(base, aggregator=replace(agg, norm_bound=args.secagg_clip), privacy=off),
            "fedbuff+secagg": replace(
                base,
                aggregator=replace(
                    agg,
                    secure_aggregation=True,
                    secagg=SecAggConfig(clip_norm=args.secagg_clip, clip_range=2 * args.secagg_clip),
                ),
                privacy=off,
            ),
        }
        for label, cfg in runs.items():
            rows.append((seed, label, asyncio.run(run_simulation(cfg))))
    print(
        f"\ntime to {args.target:.2f} on digits: {args.tta_agents} devices with stragglers, K = {args.tta_k}, "
        f"no DP, secure-aggregation clip norm {args.secagg_clip:g}, compute per local round log-normal around "
        f"{args.median} s (slow tenth x5), a real Mosquitto, "
        f"seeds {args.seed}..{args.seed + args.repeats - 1}"
    )
    head = f"{'seed':>4} {'run':<16} {'t->target s':>11} {'ratio':>7} {'final acc':>9} {'versions':>8} {'updates':>8}"
    print(f"{head} {'cohorts lost':>12}")
    ratios: dict[str, list[float]] = {}
    plain: float | None = None
    for seed, label, s in rows:
        t = time_to_accuracy(s, args.target)
        if label == "fedbuff":
            plain = t
        ratio = t / plain if (t and plain) else None
        if ratio is not None and label != "fedbuff":
            ratios.setdefault(label, []).append(ratio)
        t_text = f"{t:.1f}" if t is not None else f">{s['wall_seconds']:.0f}"
        r_text = f"{ratio:.2f}x" if ratio is not None else "-"
        print(
            f"{seed:>4} {label:<16} {t_text:>11} {r_text:>7} {s.get('final_accuracy') or 0:9.3f} "
            f"{s['model_versions']:>8} {s['updates_accepted']:>8} {s.get('cohorts_abandoned', 0):>12}"
        )
    for label, values in ratios.items():
        print(f"{label}: median {float(np.median(values)):.2f}x plain FedBuff's time over {len(values)} seeds")
    if "fedbuff+secagg" in ratios:
        median = float(np.median(ratios["fedbuff+secagg"]))
        verdict = "met" if median <= 2 else "MISSED"
        print(f"secure aggregation against plain FedBuff: {median:.2f}x (target <= 2x: {verdict})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", default="10,100", help="cohort sizes K")
    ap.add_argument("--params", default="10000,1000000", help="model sizes")
    ap.add_argument("--no-protocol", action="store_true", help="skip the protocol costs")
    ap.add_argument("--no-tta", action="store_true", help="skip time to accuracy")
    ap.add_argument("--tta-agents", type=int, default=40)
    ap.add_argument("--tta-k", type=int, default=20)
    ap.add_argument("--target", type=float, default=0.90)
    ap.add_argument("--cap", type=float, default=180.0, help="seconds per run at most")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--secagg-clip", type=float, default=SecAggConfig().clip_norm, help="the devices' clip norm under secagg"
    )
    ap.add_argument("--median", type=float, default=0.1, help="median seconds of a simulated local round")
    ap.add_argument("--repeats", type=int, default=5, help="seeds for time to accuracy (the median ratio counts)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if not args.no_protocol:
        protocol_table([int(k) for k in args.k.split(",")], [int(p) for p in args.params.split(",")])
    if not args.no_tta:
        tta(args)


if __name__ == "__main__":
    main()
