"""Tier 3, fault injection: real aggregator processes killed with SIGKILL, a real broker, real agents."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.launcher import MosquittoBroker
from simulator.chaos import ChaosConfig, format_report, run_chaos

pytestmark = [pytest.mark.broker, pytest.mark.slow]


async def test_ten_aggregator_kills_lose_nothing_receipted_and_apply_nothing_twice(
    mosquitto: MosquittoBroker, prefix: str, tmp_path: Path
) -> None:
    cfg = ChaosConfig(host=mosquitto.host, port=mosquitto.port, workdir=tmp_path, prefix=prefix, kills=10)
    report = await run_chaos(cfg)
    print(format_report(report))
    assert report.kills == 10
    assert report.problems == [] and report.ok, format_report(report) + "\n" + "\n".join(report.problems)
    assert report.receipted == report.applied > 0  # every applied update was receipted, and vice versa
    assert report.undelivered == 0
