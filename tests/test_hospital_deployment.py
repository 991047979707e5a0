"""docs/hospitals.md, step by step, as processes: certificates from ``fedmq broker init``, data
folders from ``fedmq data split``, a ``fedmq aggregator`` taking only secure sums, and one
long-lived ``fedmq agent`` per hospital on its own folder, with its own state folder."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from models.medical import HOSPITALS
from tests.helpers import tls_deployment

pytestmark = [pytest.mark.broker, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
PREFIX = "fedmq/hospitals"


def tls_flags(root: Path, port: int, identity: str) -> list[str]:
    client = root / "clients" / identity
    return [
        "--broker", f"mqtts://127.0.0.1:{port}", "--prefix", PREFIX, "--ca-file", str(client / "ca.crt"),
        "--cert-file", str(client / "client.crt"), "--key-file", str(client / "client.key"),
    ]  # fmt: skip


def agent_cmd(root: Path, port: int, name: str, data: Path, tmp: Path) -> list[str]:
    """The long-lived agent of one hospital, on its own folder, with its own state folder."""
    return [
        sys.executable, "-m", "cli", "agent", *tls_flags(root, port, name), "--id", name,
        "--data", str(data / name), "--state-dir", str(tmp / "state" / name), "--require-secure-aggregation",
        "--no-dp", "--epochs", "2", "--lr", "0.1", "--round-interval", "0.2", "--checkin-interval", "0.5",
        "--log-level", "WARNING",
    ]  # fmt: skip


def test_five_hospitals_over_tls_with_secure_aggregation(tmp_path: Path) -> None:
    names = [h.name for h in HOSPITALS]
    data = tmp_path / "data"
    split = subprocess.run(
        [sys.executable, "-m", "cli", "data", "split", "hospitals", "--out", str(data)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert split.returncode == 0, split.stderr
    manifest = json.loads((data / "manifest.json").read_text())
    with tls_deployment(names, PREFIX) as (root, broker):
        aggregator = subprocess.Popen(
            [
                sys.executable, "-m", "cli", "aggregator", *tls_flags(root, broker.port, "aggregator"),
                "--model", manifest["model"], "--hidden", str(manifest["hidden"]),
                "--num-features", str(manifest["num_features"]), "--num-classes", str(manifest["num_classes"]),
                "--labels", ",".join(manifest["labels"]), "--eval-data", str(data / "test"),
                "--buffer-size", "3", "--secure-aggregation", "--target-accuracy", "0.93",
                "--checkpoint-dir", str(tmp_path / "aggregator"), "--fresh", "--log-level", "WARNING",
            ],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        agents = [
            subprocess.Popen(
                agent_cmd(root, broker.port, name, data, tmp_path),
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for name in names
        ]
        try:
            out, err = aggregator.communicate(timeout=240)  # it stops itself at the target accuracy
        finally:
            for a in agents:
                if a.poll() is None:
                    a.send_signal(signal.SIGTERM)
            results = [a.communicate(timeout=60) for a in agents]
            if aggregator.poll() is None:
                aggregator.kill()
    assert aggregator.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["final_accuracy"] >= 0.93, summary
    assert summary["secure_aggregation"] and summary["cohorts_applied"] >= 1
    assert summary["updates_rejected"] == 0, (summary["rejected_by_reason"], err[-3000:])
    for (a_out, a_err), proc in zip(results, agents, strict=True):
        assert proc.returncode == 0, a_err[-2000:]
        stats = json.loads(a_out.strip().splitlines()[-1])
        assert stats["secure"]["masked_uploads"] >= 1 and stats["updates_published"] >= 1, stats
        assert "expects inputs in" not in a_err  # every site's folder is scaled as the model expects
    # Every site kept its state (sequence numbers, outbox) for its next start.
    assert all((tmp_path / "state" / n).is_dir() for n in names)
