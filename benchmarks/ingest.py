"""Ingest: updates/s into a real aggregator against the broker's raw throughput, in one run.

    python benchmarks/ingest.py [--sizes 100000,1000000,4000000] [--durable]

For each model size a fresh Mosquitto (the project's dev config) on a free loopback port and
three processes on this machine:

* **raw**: a plain subscriber process (aiomqtt, QoS 1, counts and timestamps what arrives)
  receives the same payloads the aggregator will get, published the same way. This is what
  the broker moves for this payload here, the ceiling for any consumer.
* **fedmq**: a real ``fedmq aggregator`` process (FedBuff, K=10, softmax model with the given
  number of parameters, no evaluation) consumes valid updates: broker -> decode -> validate ->
  staleness weight -> aggregate -> receipt, publishing a new retained model every K updates.
  The throughput is counted from the first publish to the last ``accepted`` receipt.
* The publisher, in this process, keeps 20 QoS-1 publishes in flight (Mosquitto's
  ``max_inflight_messages``) and stamps each payload with a new agent id in place, so every
  update is distinct and nothing is re-encoded while the clock runs.

With ``--durable`` the aggregator also runs with ``--checkpoint-dir``: every accepted update is
fsync'd to the write-ahead log before its receipt (a pipelined group commit, see
``aggregator/wal.py``). The table gives updates/s and MB/s for both, fedmq / raw as a ratio,
against the target of 0.8 for 1M parameters and up (issue 16: durable ingest too), and the
aggregator's CPU use (of one core).

A durable aggregator cannot log faster than the disk takes the bytes, so each durable run is
preceded by two measurements on the file system of the log (``--state-dir``), of as many bytes
as the run will log:

* **disk**: plain ``O_DIRECT`` writes of 16 MiB and one ``fdatasync`` at the end (what ``dd
  oflag=direct conv=fdatasync`` measures), the device's own ceiling at that moment;
* **log**: fedmq's :class:`~aggregator.wal.WriteAheadLog` alone, fed the same payloads, with one
  group commit in flight while the next fills, as the service runs it (CRC and staging copy
  included): the ceiling for durable ingest with nothing else running.

The table then gives durable MB/s against the lower of the two. On a VM whose disk bandwidth
varies (this one's ``O_DIRECT`` rate measured 1.6 GB/s in one session and 0.3 GB/s in another)
this is what tells a slow log from a slow disk.

All three processes use fedmq's MQTT transport, whose PUBLISH decoder copies a payload once
(``runtime/paho_shim.py``): the raw subscriber gets that speed-up as well.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiomqtt
import numpy as np

from aggregator.service import AggregatorService
from aggregator.wal import WalHeader, WriteAheadLog
from broker.launcher import MosquittoBroker
from fedmq.messages import ReceiptMessage, UpdateMessage
from models.registry import create_model
from simulator.measure import first_payload, proc_stats

ROOT = Path(__file__).resolve().parents[1]
CLASSES = 10
IN_FLIGHT = 20
TARGET = 0.8
QUIET = logging.getLogger("ingest.mqtt")
QUIET.setLevel(logging.ERROR)  # aiomqtt warns on every publish past 10 pending; 20 is the point here


_RUN_IDS = itertools.count(1)


class Payloads:
    """Valid updates for a model, re-stamped in place with a new agent id per message."""

    def __init__(self, template_tensors: dict[str, np.ndarray]) -> None:
        rng = np.random.default_rng(0)
        delta = {k: (0.001 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in template_tensors.items()}
        blob = UpdateMessage("x999999", 1, 0, 10, delta).to_bytes()
        self.template = bytearray(blob)
        self.at = blob.index(b"x999999")
        self.count = 0

    def next(self) -> tuple[str, bytes]:
        """The next update: a new agent id (seq 1), the same delta."""
        agent = f"a{self.count:06d}"
        self.count += 1
        self.template[self.at : self.at + 7] = agent.encode()
        return agent, bytes(self.template)


async def publish_all(host: str, port: int, prefix: str, payloads: Payloads, n: int) -> float:
    """Publish ``n`` updates with IN_FLIGHT in flight; return the start time (time.time)."""
    async with aiomqtt.Client(
        host, port, max_inflight_messages=IN_FLIGHT, identifier="ingest-pub", logger=QUIET
    ) as client:
        queue: asyncio.Queue[tuple[str, bytes] | None] = asyncio.Queue(maxsize=IN_FLIGHT)

        async def worker() -> None:
            while (item := await queue.get()) is not None:
                agent, data = item
                await client.publish(f"{prefix}/update/{agent}", data, qos=1)

        start = time.time()
        async with asyncio.TaskGroup() as tg:
            for _ in range(IN_FLIGHT):
                tg.create_task(worker())
            for _ in range(n):
                await queue.put(payloads.next())
            for _ in range(IN_FLIGHT):
                await queue.put(None)
        return start


async def run_raw(broker: MosquittoBroker, payloads: Payloads, n: int) -> float:
    prefix = "bench/raw"
    sink = subprocess.Popen(
        [sys.executable, __file__, "--sink", broker.host, str(broker.port), prefix, str(n)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert sink.stdout is not None
    assert sink.stdout.readline().strip() == "ready"
    start = await publish_all(broker.host, broker.port, prefix, payloads, n)
    out, _ = await asyncio.to_thread(sink.communicate, timeout=600)
    got, last = json.loads(out)
    if got != n:
        raise RuntimeError(f"raw sink got {got} of {n}")
    return n / (last - start)


async def run_aggregator(
    broker: MosquittoBroker,
    model: dict[str, np.ndarray],
    n: int,
    *,
    features: int,
    durable: bool,
    state_root: Path | None = None,
) -> tuple[float, float]:
    """Updates/s into a real aggregator and its CPU use (of one core)."""
    # A prefix of its own per run: the aggregator's persistent session and retained model
    # from an earlier run on this broker must not be mistaken for this one's.
    prefix = f"bench/fedmq-{'durable' if durable else 'memory'}-{next(_RUN_IDS)}"
    cmd = [
        sys.executable, "-m", "cli", "aggregator", "--broker", broker.url, "--prefix", prefix,
        "--rule", "fedbuff", "--buffer-size", "10", "--model", "softmax", "--num-features", str(features),
        "--num-classes", str(CLASSES), "--max-staleness", "1000000", "--log-level", "WARNING",
    ]  # fmt: skip
    with tempfile.TemporaryDirectory(dir=state_root) as state:
        if durable:
            cmd += ["--checkpoint-dir", state, "--checkpoint-every", "1000000"]
        agg = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL)
        try:
            await first_payload(broker.host, broker.port, f"{prefix}/model")  # the aggregator is up
            payloads = Payloads(model)
            accepted = 0
            last = 0.0
            rejected: dict[str, int] = {}
            async with aiomqtt.Client(broker.host, broker.port, identifier="ingest-obs") as obs:
                await obs.subscribe(f"{prefix}/receipt/+", qos=1)
                cpu0 = proc_stats(agg.pid)["cpu_s"]
                pub = asyncio.create_task(publish_all(broker.host, broker.port, prefix, payloads, n))
                async with asyncio.timeout(600):
                    async for msg in obs.messages:
                        assert isinstance(msg.payload, (bytes, bytearray))
                        r = ReceiptMessage.from_bytes(bytes(msg.payload))
                        if r.status == "accepted":
                            accepted += 1
                            last = time.time()
                        else:
                            rejected[str(r.reason)] = rejected.get(str(r.reason), 0) + 1
                        if accepted + sum(rejected.values()) >= n:
                            break
                start = await pub
                cpu = proc_stats(agg.pid)["cpu_s"] - cpu0
            if rejected:
                raise RuntimeError(f"aggregator rejected {rejected}")
            wall = last - start
            return accepted / wall, cpu / wall
        finally:
            agg.terminate()
            agg.wait(30)


DISK_CHUNK = 16 * 1024 * 1024


def disk_rate(directory: Path, nbytes: int) -> float:
    """MB/s of plain sequential ``O_DIRECT`` writes of ``nbytes`` into ``directory``, one fdatasync at the end.

    Falls back to buffered writes where the file system refuses ``O_DIRECT`` (tmpfs).
    """
    buf = mmap.mmap(-1, DISK_CHUNK)  # page-aligned, as O_DIRECT needs
    buf.write(os.urandom(DISK_CHUNK))  # bytes no file system could compress
    path = directory / "disk-probe"
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    try:
        fd = os.open(path, flags | getattr(os, "O_DIRECT", 0), 0o600)
    except OSError:
        fd = os.open(path, flags, 0o600)
    try:
        start = time.perf_counter()
        written = 0
        while written < nbytes:
            written += os.pwrite(fd, buf, written)
        os.fdatasync(fd)
        return written / 1e6 / (time.perf_counter() - start)
    finally:
        os.close(fd)
        path.unlink()
        buf.close()


def log_rate(directory: Path, payload: bytes, n: int) -> float:
    """MB/s of fedmq's write-ahead log alone: ``n`` records of ``payload``, pipelined as the service does.

    A group commit starts whenever none is in flight (the service's committer task), and
    appending waits behind the one in flight once the service's back-pressure bound is reached.
    """
    log_dir = directory / "log-probe"
    log_dir.mkdir()
    wal = WriteAheadLog.create(log_dir, WalHeader(run="probe", generation=1, base_lsn=0))
    try:
        start = time.perf_counter()
        inflight = None
        for i in range(n):
            wal.write_update(f"a{i:06d}", payload, now=0.0, index=i)
            if inflight is not None and (inflight.done() or wal.unsynced >= AggregatorService.GROUP_COMMIT_BYTES):
                inflight.result()  # raises what kept a commit from the disk
                inflight = None
            if inflight is None:
                inflight = wal.commit_async()
        if inflight is not None:
            inflight.result()
        wal.commit_async().result()
        return float(wal.synced_offset) / 1e6 / (time.perf_counter() - start)
    finally:
        wal.close()
        for f in log_dir.iterdir():
            f.unlink()
        log_dir.rmdir()


async def sink_main(host: str, port: int, prefix: str, n: int) -> None:
    got = 0
    last = 0.0
    async with aiomqtt.Client(host, port, identifier="ingest-sink") as client:
        await client.subscribe(f"{prefix}/update/+", qos=1)
        print("ready", flush=True)
        async for _ in client.messages:
            got += 1
            last = time.time()
            if got >= n:
                break
    print(json.dumps([got, last]), flush=True)


async def main_async(args: argparse.Namespace) -> None:
    sizes = [int(s) for s in args.sizes.split(",")]
    print(
        f"ingest: publisher with {IN_FLIGHT} QoS-1 publishes in flight; aggregator FedBuff K=10; "
        f"Mosquitto 2.0 on loopback; median of {args.repeat} alternating runs"
    )
    cols = f"{'params':>10} {'MB':>6} {'n':>5} | {'raw msg/s':>9} {'raw MB/s':>8} | {'fedmq msg/s':>11} {'MB/s':>6}"
    cols += f" {'/raw':>5} {'ok>=0.8':>7} {'agg CPU':>7}"
    if args.durable:
        cols += f" | {'durable msg/s':>13} {'/raw':>5} {'ok>=0.8':>7} {'agg CPU':>7}"
        cols += f" | {'disk MB/s':>9} {'log MB/s':>8} {'durable MB/s':>12} {'/min':>5}"
    print(cols)
    for params in sizes:
        features = max(1, params // CLASSES - 1)
        agg_model = create_model("softmax", num_features=features, num_classes=CLASSES).get_weights()
        payloads = Payloads(agg_model)
        mb = len(payloads.template) / 1e6
        n = args.messages or max(100, min(3000, int(1500 / mb)))
        raws: list[float] = []
        rates: list[float] = []
        cpus: list[float] = []
        drates: list[float] = []
        dcpus: list[float] = []
        disks: list[float] = []
        logs: list[float] = []
        for _ in range(args.repeat):
            broker = MosquittoBroker().start()  # a fresh broker per repetition: no retained state carried over
            try:
                raws.append(await run_raw(broker, payloads, n))
                rate, cpu = await run_aggregator(broker, agg_model, n, features=features, durable=False)
                rates.append(rate)
                cpus.append(cpu)
                if args.durable:
                    with tempfile.TemporaryDirectory(dir=args.state_dir) as probe:
                        disks.append(await asyncio.to_thread(disk_rate, Path(probe), n * len(payloads.template)))
                        logs.append(await asyncio.to_thread(log_rate, Path(probe), bytes(payloads.template), n))
                    rate, cpu = await run_aggregator(
                        broker, agg_model, n, features=features, durable=True, state_root=args.state_dir
                    )
                    drates.append(rate)
                    dcpus.append(cpu)
            finally:
                broker.cleanup()
        raw, rate, cpu = statistics.median(raws), statistics.median(rates), statistics.median(cpus)
        ratio = rate / raw
        ok = "yes" if ratio >= TARGET else ("NO" if params >= 1_000_000 else "-")
        row = f"{params:>10,} {mb:6.1f} {n:>5} | {raw:9.1f} {raw * mb:8.1f} | {rate:11.1f} {rate * mb:6.1f}"
        row += f" {ratio:5.2f} {ok:>7} {cpu:6.0%}"
        if args.durable:
            drate = statistics.median(drates)
            dok = "yes" if drate / raw >= TARGET else ("NO" if params >= 1_000_000 else "-")
            row += f" | {drate:13.1f} {drate / raw:5.2f} {dok:>7} {statistics.median(dcpus):6.0%}"
            disk, logged = statistics.median(disks), statistics.median(logs)
            row += f" | {disk:9.0f} {logged:8.0f} {drate * mb:12.0f} {drate * mb / min(disk, logged):5.2f}"
        print(row, flush=True)
        if args.verbose:
            runs = f"    runs: raw {[round(x, 1) for x in raws]} fedmq {[round(x, 1) for x in rates]}"
            if drates:
                runs += f" durable {[round(x, 1) for x in drates]}"
                runs += f" disk MB/s {[round(x) for x in disks]} log MB/s {[round(x) for x in logs]}"
            print(runs, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000,4000000")
    ap.add_argument("--messages", type=int, default=0, help="updates per run (default: about 1.5 GB worth)")
    ap.add_argument("--durable", action="store_true", help="also run with the write-ahead log (receipts after fsync)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="where the durable aggregator's log and the disk probes go (default: the temporary folder)",
    )
    ap.add_argument("--verbose", action="store_true", help="print every run's figure")
    ap.add_argument("--sink", nargs=4, metavar=("HOST", "PORT", "PREFIX", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.sink:
        host, port, prefix, n = args.sink
        asyncio.run(sink_main(host, int(port), prefix, int(n)))
        return
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
