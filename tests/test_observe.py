"""Tier 1 and 2 for what operators see: the sans-IO observatory, the Prometheus rendering, the HTTP seam."""

from __future__ import annotations

import asyncio
import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aggregator.http import MAX_REQUEST_BYTES, HttpEndpoint
from aggregator.observe import STALENESS_BUCKETS, Histogram, Observatory, PrometheusExport, json_safe


@given(st.lists(st.floats(min_value=0, max_value=1e4, allow_nan=False), max_size=200))
def test_histogram_counts_as_prometheus_defines_buckets(values: list[float]) -> None:
    h = Histogram(STALENESS_BUCKETS)
    for v in values:
        h.observe(v)
    cumulative = h.cumulative()
    for bound, count in zip(STALENESS_BUCKETS, cumulative, strict=False):
        assert count == sum(1 for v in values if v <= bound)  # le: at or below the bound
    assert cumulative[-1] == h.n == len(values)
    assert h.total == pytest.approx(sum(values))


def test_histogram_ignores_what_cannot_be_a_staleness_or_latency() -> None:
    h = Histogram((1.0,))
    for bad in (-1.0, math.nan, math.inf):
        h.observe(bad)
    assert h.n == 0 and h.cumulative() == [0, 0]


def test_the_observatory_is_bounded_and_forgets_the_least_recent_agent() -> None:
    obs = Observatory(max_agents=3, max_points=5)
    for i in range(5):
        obs.status(f"a{i}", "online", epsilon=float(i), budget=10.0, now=float(i))
    assert list(obs.agents) == ["a2", "a3", "a4"]
    obs.accepted("a2", staleness=1, latency=0.001, epsilon=2.5, now=9.0)
    assert list(obs.agents)[-1] == "a2" and obs.agents["a2"].epsilon == 2.5
    for v in range(12):
        obs.evaluated(float(v), v, v / 12, 1.0)
    assert len(obs.points) <= 6 and obs.points[0][1] == 0 and obs.points[-1][1] == 11


def test_the_snapshot_takes_liveness_from_the_core() -> None:
    obs = Observatory()
    obs.status("a", "online", epsilon=1.0, budget=None, now=0.0)
    obs.status("b", "online", epsilon=None, budget=None, now=0.0)
    obs.rejected("b", "malformed", now=5.0)
    snap = obs.snapshot({"version": 3}, online=["a"], now=10.0)
    rows = {r["id"]: r for r in snap["agents"]}
    assert rows["a"]["online"] and rows["a"]["seconds_since_seen"] == 10.0
    assert not rows["b"]["online"] and rows["b"]["state"] == "offline" and rows["b"]["last_reason"] == "malformed"
    assert snap["metrics"] == {"version": 3}


def test_json_safe_turns_non_finite_numbers_into_null() -> None:
    import numpy as np

    value = {"a": math.inf, "b": [math.nan, 1.5], "c": np.float32(2.0), "d": np.int64(3), "e": "x"}
    assert json.loads(json.dumps(json_safe(value), allow_nan=False)) == {
        "a": None, "b": [None, 1.5], "c": 2.0, "d": 3, "e": "x"
    }  # fmt: skip


def test_prometheus_rendering_reads_the_counters_at_scrape_time() -> None:
    pytest.importorskip("prometheus_client")
    obs = Observatory()
    obs.accepted("a", staleness=2, latency=0.002, epsilon=1.25, now=0.0)
    progress = {
        "accepted": 7, "rejected_by_reason": {"malformed": 2}, "retried_by_reason": {}, "duplicates": 1,
        "version": 4, "agents_online": 1, "agents_offline": 0, "max_epsilon": math.inf, "accuracy": None,
        "loss": None, "mean_staleness": 2.0,
    }  # fmt: skip
    text = PrometheusExport(obs, lambda: progress, "fedmq/x").render()[0].decode()
    assert 'fedmq_updates_accepted_total{federation="fedmq/x"} 7.0' in text
    assert 'fedmq_updates_rejected_total{federation="fedmq/x",reason="malformed"} 2.0' in text
    assert 'fedmq_agent_epsilon{agent="a",federation="fedmq/x"} 1.25' in text
    assert 'fedmq_max_epsilon{federation="fedmq/x"} +Inf' in text and "fedmq_accuracy" in text
    assert 'fedmq_update_staleness_bucket{federation="fedmq/x",le="2"} 1.0' in text
    progress["accepted"] = 8  # a scrape later sees the new figure
    assert (
        'fedmq_updates_accepted_total{federation="fedmq/x"} 8.0'
        in PrometheusExport(obs, lambda: progress, "fedmq/x").render()[0].decode()
    )


async def _request(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    writer.write_eof()  # all the client will send: the server must not wait for more
    try:
        async with asyncio.timeout(20):
            return await reader.read()
    finally:
        writer.close()


async def test_the_http_endpoint_survives_what_a_client_sends() -> None:
    states = []

    def state() -> dict[str, object]:
        states.append(1)
        return {"metrics": {"version": len(states)}}

    http = HttpEndpoint("127.0.0.1", 0, state=state, metrics=None, healthy=lambda: False)
    await http.start()
    try:
        ok = await _request(http.port, b"GET /api/state HTTP/1.1\r\nHost: x\r\n\r\n")
        assert ok.startswith(b"HTTP/1.1 200 OK") and json.loads(ok.split(b"\r\n\r\n", 1)[1]) == {
            "metrics": {"version": 1}
        }
        page = await _request(http.port, b"GET / HTTP/1.1\r\n\r\n")
        assert b"text/html" in page and b"fedmq dashboard" in page
        assert (await _request(http.port, b"GET /nope HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 404")
        assert (await _request(http.port, b"POST /api/state HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 405")
        assert (await _request(http.port, b"\xff\xfe garbage\r\n\r\n")).startswith(b"HTTP/1.1 400")
        assert (await _request(http.port, b"GET /healthz HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 503")
        assert (await _request(http.port, b"GET /metrics HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 404")
        assert await _request(http.port, b"GET /" + b"a" * (2 * MAX_REQUEST_BYTES)) == b""  # too long: closed
        assert await _request(http.port, b"GET / HTTP/1.1\r\n") == b""  # EOF before the end of the head
        again = await _request(http.port, b"GET /api/state HTTP/1.1\r\n\r\n")
        assert again.startswith(b"HTTP/1.1 200 OK")  # still serving
    finally:
        await http.close()
