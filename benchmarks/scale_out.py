"""Scale-out: sharded aggregation on a 3-node loopback NATS cluster, 1, 2 and 3 shards.

    python benchmarks/scale_out.py [--params 100000] [--updates 600] [--shards 1,2,3] [--repeat 1]

For each shard count: a fresh 3-node NATS cluster (``broker.nats``, JetStream R3), that many
``fedmq aggregator --nats`` processes (FedBuff K=10, partials of 5), and a publisher in this
process that sends valid updates over MQTT, spread round-robin over the three nodes' MQTT
listeners, with 20 QoS-1 publishes in flight per node. Counted from the first publish to the
last ``accepted`` receipt (receipts follow commits): updates/s, and the shards' CPU (user +
system, all shard processes together) per update. The last buffer short of K is never
stepped, so the count stops at ``updates - K``.

The table gives each row against one shard as a ratio. The target (issue 16): CPU per update
with 3 shards within 1.2x of one shard, i.e. no coordination tax. On one 2-core machine the
shards share the cores with three NATS servers and the publisher, so updates/s does not grow
with shards here; the per-shard rate is what a multi-host deployment multiplies (see
docs/scale-out.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiomqtt
import nats

from broker.nats import NatsCluster
from fedmq.messages import ReceiptMessage
from models.registry import create_model
from simulator.measure import proc_stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest import IN_FLIGHT, QUIET, Payloads  # a sibling benchmark script

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "bench/scale"
K = 10
TARGET = 1.2


async def publish_spread(cluster: NatsCluster, payloads: Payloads, n: int) -> float:
    """Publish ``n`` updates round-robin over the nodes' MQTT listeners; return the start time."""
    queue: asyncio.Queue[tuple[str, bytes] | None] = asyncio.Queue(maxsize=IN_FLIGHT)
    start = 0.0

    async def node_worker(index: int) -> None:
        node = cluster.nodes[index]
        async with aiomqtt.Client(
            node.host, node.mqtt_port, identifier=f"pub-{index}", max_inflight_messages=IN_FLIGHT, logger=QUIET
        ) as client:

            async def one() -> None:
                while (item := await queue.get()) is not None:
                    agent, data = item
                    await client.publish(f"{PREFIX}/update/{agent}", data, qos=1)

            async with asyncio.TaskGroup() as tg:
                for _ in range(IN_FLIGHT):
                    tg.create_task(one())

    async with asyncio.TaskGroup() as tg:
        workers = [tg.create_task(node_worker(i)) for i in range(len(cluster.nodes))]
        start = time.time()
        for _ in range(n):
            await queue.put(payloads.next())
        for _ in range(IN_FLIGHT * len(workers)):
            await queue.put(None)
    return start


def start_shard(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """One shard process, its log in ``log`` (printed if it never serves)."""
    with log.open("wb") as err:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)


async def run(shards: int, params: int, n: int, tmp: Path) -> tuple[float, float]:
    """Updates/s and the shards' CPU-ms per update."""
    features = max(1, params // 10 - 1)
    model = create_model("softmax", num_features=features, num_classes=10).get_weights()
    payloads = Payloads(model)
    cluster = NatsCluster(3, workdir=tmp / f"nats-{shards}").start(timeout=120)
    urls = ",".join(f"nats://{n.host}:{n.client_port}" for n in cluster.nodes)
    env = {**os.environ, "FEDMQ_AGGREGATOR__HTTP": ""}
    cmd = [
        sys.executable, "-m", "cli", "aggregator", "--nats", urls, "--broker", cluster.nodes[0].url,
        "--prefix", PREFIX, "--model", "softmax", "--num-features", str(features), "--num-classes", "10",
        "--buffer-size", str(K), "--partial-size", "5", "--max-staleness", "1000000", "--log-level", "WARNING",
    ]  # fmt: skip
    logs = [tmp / f"shard-{i}.log" for i in range(shards)]
    procs = [start_shard(cmd, env, path) for path in logs]
    try:
        nc = await nats.connect(urls.split(","))
        accepted = 0
        last = 0.0
        done = asyncio.Event()

        async def on_receipt(msg: object) -> None:
            nonlocal accepted, last
            r = ReceiptMessage.from_bytes(msg.data)  # type: ignore[attr-defined]
            if r.status == "accepted":
                accepted += 1
                last = time.time()
                if accepted >= n - K:
                    done.set()

        await nc.subscribe(PREFIX.replace("/", ".") + ".receipt.*", cb=on_receipt)
        async with aiomqtt.Client(cluster.nodes[1].host, cluster.nodes[1].mqtt_port, identifier="wait") as c:
            await c.subscribe(f"{PREFIX}/model", qos=1)
            try:
                async with asyncio.timeout(120):
                    async for _ in c.messages:  # the leader published version 0: the shards are up
                        break
            except TimeoutError:
                tails = "\n".join(f"--- {p.name}\n" + "".join(p.read_text().splitlines(True)[-15:]) for p in logs)
                raise SystemExit(f"no model from {shards} shard(s) within 120 s; their logs:\n{tails}") from None
        cpu0 = sum(proc_stats(p.pid)["cpu_s"] for p in procs)
        start = await publish_spread(cluster, payloads, n)
        async with asyncio.timeout(600):
            await done.wait()
        cpu = sum(proc_stats(p.pid)["cpu_s"] for p in procs) - cpu0
        await nc.close()
        return accepted / (last - start), 1000 * cpu / accepted
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(60)
        cluster.cleanup()


async def main_async(args: argparse.Namespace) -> None:
    counts = [int(s) for s in args.shards.split(",")]
    print(
        f"scale-out: {args.params:,} parameters, {args.updates} updates, FedBuff K={K}, partials of 5; "
        f"3 NATS nodes (JetStream R3) on loopback; median of {args.repeat}"
    )
    print(f"{'shards':>6} | {'updates/s':>9} {'x 1 shard':>9} | {'CPU ms/update':>13} {'x 1 shard':>9} {'ok<=1.2':>7}")
    base_rate = base_cpu = 0.0
    with tempfile.TemporaryDirectory() as folder:
        for shards in counts:
            rates, cpus = [], []
            for r in range(args.repeat):
                rate, cpu = await run(shards, args.params, args.updates, Path(folder) / f"{shards}-{r}")
                rates.append(rate)
                cpus.append(cpu)
            rate, cpu = statistics.median(rates), statistics.median(cpus)
            if shards == counts[0]:
                base_rate, base_cpu = rate, cpu
            ok = "yes" if cpu / base_cpu <= TARGET else "NO"
            row = f"{shards:>6} | {rate:9.1f} {rate / base_rate:9.2f} | {cpu:13.2f} {cpu / base_cpu:9.2f} {ok:>7}"
            print(row, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=int, default=100_000)
    ap.add_argument("--updates", type=int, default=600)
    ap.add_argument("--shards", default="1,2,3")
    ap.add_argument("--repeat", type=int, default=1)
    asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    main()
