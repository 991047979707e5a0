"""What `pip install fedmq` puts on a device: size, packages, and the agent's peak memory.

    python benchmarks/install_size.py [--extras demo]

For the device install (no extras) and each ``--extras`` given, a fresh venv is created in a
temporary folder and this checkout is installed into it (not editable, as a user would). Then:

- size: the venv's ``site-packages`` on disk, and the number of distributions in it (pip,
  setuptools and wheel, which every venv has, are not counted), and the largest of them;
- what is missing: scikit-learn, torch and matplotlib must not be importable in the device venv;
- agent RSS: ``fedmq agent`` from that venv against a real Mosquitto and a real aggregator (from
  this environment), on a local ``.npz`` of 360 digits, with DP, for 5 updates; its peak RSS
  (``VmHWM``, sampled every 20 ms until it exits).

The baseline row is the install before issue 15 (every server-side package in the default
install), as measured then: 467 MB and 54 packages.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from broker.launcher import MosquittoBroker
from models.datasets import digits, save_npz

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ("pip install fedmq before issue 15", 467.0, 54)
DEVICE_ONLY_ABSENT = ("sklearn", "torch", "matplotlib", "amqtt", "prometheus_client")


VENV_OWN = ("pip", "setuptools", "wheel", "pkg_resources", "_distutils_hack", "distutils-precedence.pth")
"""What every venv holds before anything is installed: not counted."""


def _du_mb(site: Path) -> float:
    total = 0
    for top in site.iterdir():
        if top.name.split("-")[0] in VENV_OWN or top.name in VENV_OWN:
            continue
        files = [top] if top.is_file() else top.rglob("*")
        total += sum(p.stat().st_size for p in files if p.is_file() and not p.is_symlink())
    return total / 1e6


def _du_mb_of(site: Path, dist: str) -> float:
    """A distribution's files (its RECORD), in MB."""
    norm = dist.lower().replace("-", "_")
    for info in site.glob("*.dist-info"):
        if info.name.lower().replace("-", "_").startswith(norm + "_"):
            total = 0
            for line in (info / "RECORD").read_text().splitlines():
                f = site / line.split(",")[0]
                if f.is_file():
                    total += f.stat().st_size
            return total / 1e6
    return 0.0


def install(venv: Path, extras: str) -> tuple[float, int, list[str]]:
    """A fresh venv with this checkout (and ``extras``); its site-packages size, distributions, absent modules."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    target = f"{ROOT}[{extras}]" if extras else str(ROOT)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-warn-script-location", target], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    listed = subprocess.run(
        [str(py), "-m", "pip", "list", "--format=freeze"], check=True, capture_output=True, text=True
    ).stdout.split()
    dists = [d for d in listed if d.split("==")[0].lower() not in ("pip", "setuptools", "wheel")]
    sizes = sorted(((_du_mb_of(site, d.split("==")[0]), d.split("==")[0]) for d in dists), reverse=True)
    print(f"{extras or 'device'}: largest " + ", ".join(f"{n} {mb:.0f} MB" for mb, n in sizes[:4]), flush=True)
    absent = []
    for mod in DEVICE_ONLY_ABSENT:
        found = subprocess.run([str(py), "-c", f"import {mod}"], capture_output=True).returncode == 0
        if not found:
            absent.append(mod)
    return _du_mb(site), len(dists), absent


def _vm_hwm_kib(pid: int) -> int:
    """The process's peak resident set (``VmHWM``), in KiB; 0 once it is gone.

    Not ``ru_maxrss`` from ``wait4``: Linux carries a process's high-water mark across exec, so a
    child of this (large) Python process would report this process's size, whatever it runs.
    ``VmHWM`` belongs to the address space, which exec replaces.
    """
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return 0
    return 0


def agent_rss(venv: Path, workdir: Path) -> tuple[float, int]:
    """Peak RSS (MiB) and exit code of `fedmq agent` from ``venv`` for 5 updates against a live federation."""
    train, _ = digits()
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "device.npz"
    save_npz(data, train.subset(np.arange(360)))
    broker = MosquittoBroker(workdir=workdir / "mosquitto").start()
    prefix = f"fedmq/size{os.getpid()}"
    url = f"mqtt://{broker.host}:{broker.port}"
    aggregator = subprocess.Popen(
        [sys.executable, "-m", "cli", "aggregator", "--broker", url, "--prefix", prefix, "--buffer-size", "1",
         "--http", "", "--rate-limit", "0"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        agent = subprocess.Popen(
            [str(venv / "bin" / "fedmq"), "agent", "--broker", url, "--prefix", prefix, "--id", "pi",
             "--data", str(data), "--max-updates", "5", "--round-interval", "0.2"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        peak = 0
        while agent.poll() is None:
            peak = max(peak, _vm_hwm_kib(agent.pid))
            time.sleep(0.02)  # sampling the child's high-water mark: no event to wait on
        return peak / 1024, agent.returncode
    finally:
        aggregator.terminate()
        aggregator.wait(30)
        broker.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--extras", default="", help="comma-separated extras to measure too, e.g. server,demo")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedmq-size-") as tmp:
        for extras in ["", *[e for e in args.extras.split(",") if e]]:
            venv = Path(tmp) / (extras or "device")
            size, count, absent = install(venv, extras)
            rss, code = agent_rss(venv, Path(tmp) / f"run-{extras or 'device'}") if not extras else (float("nan"), 0)
            label = f"pip install fedmq[{extras}]" if extras else "pip install fedmq (device)"
            rows.append((label, size, count, rss, code, absent))
            shutil.rmtree(venv, ignore_errors=True)
    print(f"{'install':<36} {'MB':>7} {'vs before':>9} {'packages':>8} {'agent peak RSS':>15}  not installed")
    b_label, b_size, b_count = BASELINE
    print(f"{b_label:<36} {b_size:>7.0f} {1.0:>9.2f} {b_count:>8}  {'-':>15}  -")
    for label, size, count, rss, code, absent in rows:
        shown = f"{rss:.0f} MiB" + ("" if code == 0 else f" (exit {code})") if rss == rss else "-"
        print(f"{label:<36} {size:>7.0f} {size / b_size:>9.2f} {count:>8}  {shown:>15}  {', '.join(absent) or '-'}")


if __name__ == "__main__":
    main()
