"""Agent footprint: peak RSS, start-up time and CPU per local round of `fedmq agent`.

    python benchmarks/footprint.py

For each variant a real Mosquitto and a real `fedmq aggregator` (with that model) run, and
`fedmq agent` is started as a child process on the bundled digits data with
`--max-updates 5`. Measured per variant, median of ``--repeat`` runs:

- start-up: from exec until the agent's retained ``online`` status reaches the broker
  (imports, config, loading the data from a ``.npz`` as a device would, connect);
- peak RSS of the agent process (``ru_maxrss`` from ``wait4``) and its total CPU time;
- CPU per local round: ``LocalTrainer.train`` in this process, ``time.process_time``
  (all threads), median of 10 rounds after one warm-up.

The baseline row is a bare interpreter importing what the agent cannot do without
(numpy, msgpack, paho-mqtt); ratios are against it and against the 60 MiB target.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiomqtt
import numpy as np

from broker.launcher import MosquittoBroker
from fedmq.messages import StatusMessage
from models.datasets import digits, save_npz

ROOT = Path(__file__).resolve().parents[1]
TARGET_MIB = 60.0
VARIANTS = {
    "numpy softmax (no DP)": {"model": "softmax", "agent_args": ["--no-dp"]},
    "numpy softmax + DP": {"model": "softmax", "agent_args": []},
    "numpy mlp + DP": {"model": "mlp", "agent_args": []},
    "numpy mlp + DP + onnx": {"model": "mlp", "agent_args": ["--onnx-out", "{tmp}/model.onnx"]},
    "torch digits-cnn + DP": {"model": "digits-cnn", "agent_args": []},
}


def _rusage_child(cmd: list[str]) -> tuple[float, float, float]:
    """Run ``cmd``; return (wall seconds, peak RSS MiB, CPU seconds).

    The child is started through GNU time: a process forked from this (large) benchmark
    process is charged the parent's pages in its ``ru_maxrss`` until it execs, which would
    inflate every figure by this process's own size.
    """
    gnu_time = shutil.which("time") or "/usr/bin/time"
    with tempfile.NamedTemporaryFile("r", suffix=".rusage") as out:
        t0 = time.perf_counter()
        proc = subprocess.run([gnu_time, "-f", "%M %U %S", "-o", out.name, *cmd], cwd=ROOT, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{cmd} exited with {proc.returncode}")
        kib, user, system = out.read().split()[-3:]
    return wall, int(kib) / 1024, float(user) + float(system)


async def _agent_run(broker: MosquittoBroker, prefix: str, model: str, extra: list[str], tmp: Path) -> dict[str, float]:
    url = f"mqtt://{broker.host}:{broker.port}"
    agg = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli", "aggregator", "--broker", url, "--prefix", prefix,
        "--model", model, "--buffer-size", "1", "--log-level", "ERROR", cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        async with aiomqtt.Client(broker.host, broker.port) as watch:
            await watch.subscribe(f"{prefix}/model", qos=1)
            async with asyncio.timeout(60):
                async for _ in watch.messages:  # the aggregator is serving
                    break
            await watch.subscribe(f"{prefix}/status/fp", qos=1)
            cmd = [
                sys.executable, "-m", "cli", "agent", "--broker", url, "--prefix", prefix, "--id", "fp",
                "--data", f"{tmp}/digits.npz", "--max-updates", "5", "--round-interval", "0",
                "--log-level", "ERROR", *[a.format(tmp=tmp) for a in extra],
            ]  # fmt: skip
            t0 = time.perf_counter()
            child = asyncio.create_task(asyncio.to_thread(_rusage_child, cmd))
            started = None
            async with asyncio.timeout(120):
                async for msg in watch.messages:
                    data = msg.payload if isinstance(msg.payload, (bytes, bytearray)) else b""
                    if data and StatusMessage.from_bytes(bytes(data)).state == "online":
                        started = time.perf_counter() - t0
                        break
            wall, rss, cpu = await child
    finally:
        agg.terminate()
        await agg.wait()
    return {"startup": started or float("nan"), "rss": rss, "cpu": cpu, "wall": wall}


def _round_cpu(model: str, dp: bool) -> float:
    from edge_agent.trainer import LocalTrainer
    from fedmq.config import AgentConfig, PrivacyConfig
    from fedmq.messages import ModelMessage, ModelSpec
    from models.datasets import load_source
    from models.registry import create_model

    data = load_source("builtin:digits-train")
    spec = ModelSpec(model, data.x.shape[1], 10, 64)
    weights = create_model(model, num_features=spec.num_features, num_classes=10, hidden=64, seed=0).get_weights()
    msg = ModelMessage(version=0, model=spec, tensors=weights)
    privacy = PrivacyConfig(enabled=dp)
    trainer = LocalTrainer(AgentConfig(agent_id="fp"), privacy, data, rng=np.random.default_rng(0))
    trainer.train(msg)  # warm-up
    times = []
    for _ in range(10):
        t0 = time.process_time()
        trainer.train(msg)
        times.append(time.process_time() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    args = p.parse_args()

    base_cmd = [sys.executable, "-c", "import numpy, msgpack, paho.mqtt.client"]
    base = [_rusage_child(base_cmd) for _ in range(args.repeat)]
    base_rss = statistics.median(b[1] for b in base)
    base_wall = statistics.median(b[0] for b in base)
    torch_free = subprocess.run(
        [sys.executable, "-c", "import sys, edge_agent.cli, edge_agent.service; print('torch' in sys.modules)"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.strip() == "False"  # fmt: skip
    rows = []
    broker = MosquittoBroker()
    broker.start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            save_npz(Path(tmp) / "digits.npz", digits()[0])
            for i, name in enumerate(args.variants.split(",")):
                v = VARIANTS[name]
                model, extra = str(v["model"]), [str(a) for a in v["agent_args"]]
                runs = [
                    asyncio.run(_agent_run(broker, f"fedmq/fp{i}r{r}", model, extra, Path(tmp)))
                    for r in range(args.repeat)
                ]
                med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                rows.append((name, med, _round_cpu(model, "--no-dp" not in extra)))
    finally:
        broker.cleanup()
    print(f"agent footprint (median of {args.repeat}); baseline: python importing numpy, msgpack, paho-mqtt")
    print(f"agent modules import torch: {not torch_free}")
    head = f"{'variant':<28}{'start-up s':>11}{'x base':>8}{'peak RSS MiB':>14}{'x base':>8}{'/ 60 MiB':>9}"
    head += f"{'CPU/round ms':>14}{'total CPU s':>13}"
    print(head)
    ratio = base_rss / TARGET_MIB
    print(f"{'baseline imports':<28}{base_wall:>11.2f}{1.0:>8.2f}{base_rss:>14.1f}{1.0:>8.2f}{ratio:>9.2f}")
    for name, med, cpu_round in rows:
        print(
            f"{name:<28}{med['startup']:>11.2f}{med['startup'] / base_wall:>8.2f}{med['rss']:>14.1f}"
            f"{med['rss'] / base_rss:>8.2f}{med['rss'] / TARGET_MIB:>9.2f}{cpu_round * 1e3:>14.1f}{med['cpu']:>13.2f}"
        )


if __name__ == "__main__":
    main()
