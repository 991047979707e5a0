"""The aggregator's dashboard in a real browser (Playwright, Debian's chromium) against a live federation.

A real Mosquitto, an aggregator serving its dashboard on a free loopback port, three agents
training on digits and one device sending garbage. The page must load, its chart must grow as
versions are evaluated, and once the federation is still, every number on it must equal the
Prometheus endpoint's and the metrics topic's.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import urllib.request
from dataclasses import replace
from pathlib import Path

import aiomqtt
import numpy as np
import pytest

from aggregator.service import AggregatorService
from broker.launcher import MosquittoBroker
from edge_agent.service import AgentService
from edge_agent.trainer import LocalTrainer
from fedmq.config import AgentConfig, AggregatorConfig, BrokerConfig, Config, PrivacyConfig
from fedmq.messages import metrics_from_bytes
from models.datasets import digits
from tests.helpers import payload, wait_for_message, wait_until

pytestmark = pytest.mark.broker
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
UPDATES_EACH = 8


def _prometheus(url: str) -> dict[str, float]:
    """``name{labels}`` -> value of every sample on /metrics."""
    text = urllib.request.urlopen(url + "metrics", timeout=30).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def _sample(samples: dict[str, float], name: str, **labels: str) -> float:
    for key, value in samples.items():
        if key.split("{")[0] == name and all(f'{k}="{v}"' in key for k, v in labels.items()):
            return value
    raise AssertionError(f"no sample {name} {labels} in {sorted(samples)[:20]}")


async def test_dashboard_shows_the_live_federation_and_matches_the_metrics(
    mosquitto: MosquittoBroker, prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run does)")
    playwright = pytest.importorskip("playwright.async_api")

    train, test = digits()
    broker = BrokerConfig(host=mosquitto.host, port=mosquitto.port)
    agg = AggregatorConfig(rule="fedbuff", buffer_size=3, metrics_interval=0.2, http="127.0.0.1:0", rate_limit=0)
    cfg = Config(prefix=prefix, broker=broker, aggregator=agg).validate()
    server = AggregatorService(cfg, eval_data=test)
    stop_server = asyncio.Event()
    server_task = asyncio.create_task(server.run(stop_server))
    await asyncio.wait_for(server.ready.wait(), 30)
    assert server.http is not None and server.http.port != 0

    privacy = PrivacyConfig(clip_norm=2.0, noise_multiplier=0.2, epsilon_budget=200.0)
    agents = []
    for i in range(3):
        acfg = AgentConfig(
            agent_id=f"device-{i}",
            round_interval=0.3,
            max_updates=UPDATES_EACH,
            lr=0.3,
            local_epochs=2,
            summary_interval=0.5,
        )
        shard = train.subset(np.arange(i, len(train), 3))
        trainer = LocalTrainer(acfg, privacy, shard, rng=np.random.default_rng(i))
        agents.append(AgentService(replace(cfg, agent=acfg, privacy=privacy), trainer))

    caplog.set_level(logging.INFO, logger="fedmq")
    async with playwright.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            await page.goto(server.http.url)
            await page.wait_for_selector("#conn.ok", timeout=60_000)  # the page loaded and reached /api/state
            assert await page.title() == "fedmq dashboard"

            runs = [asyncio.create_task(a.run()) for a in agents]
            # A third-party device's garbage: refused, counted, shown by reason.
            async with aiomqtt.Client(mosquitto.host, mosquitto.port) as rogue:
                await rogue.publish(cfg.topics.update("rogue"), b"\xc1 not msgpack", qos=1)

            # The chart updates: more evaluated versions appear while the agents train.
            chart_points = "Number(document.getElementById('chart').dataset.points)"
            await page.wait_for_function(f"{chart_points} >= 2", timeout=90_000)
            first = int(await page.evaluate(chart_points))
            await page.wait_for_function(f"{chart_points} > {first}", timeout=90_000)

            await asyncio.wait_for(asyncio.gather(*runs), 120)  # each sends its updates and stops
            core = server.core
            assert core is not None
            await wait_until(server.pulse, lambda: core.stats.accepted == 3 * UPDATES_EACH and not core.online, 60)
            await wait_until(server.pulse, lambda: (server.rt.evals.last or None) is not None
                             and server.rt.evals.last.version == core.version, 60)  # fmt: skip
            version = core.version
            await page.wait_for_function(f"document.body.dataset.version === '{version}'", timeout=30_000)
            await page.wait_for_function("document.getElementById('agents-online').textContent === '0'", timeout=30_000)
            await page.wait_for_function(
                f"Number(document.getElementById('chart').dataset.points) === {len(server.observatory.points)}",
                timeout=30_000,
            )

            # Its numbers match the Prometheus endpoint's and the metrics topic's.
            prom = await asyncio.to_thread(_prometheus, server.http.url)  # the server runs on this loop
            fed = {"federation": prefix}
            topic = metrics_from_bytes(
                payload(
                    await wait_for_message(
                        mosquitto.host,
                        mosquitto.port,
                        cfg.topics.metrics,
                        lambda m: metrics_from_bytes(payload(m))["version"] == version,
                        limit=30,
                    )
                )
            )

            async def shown(element: str) -> str:
                return (await page.text_content(f"#{element}") or "").strip()

            assert await shown("version") == str(version) == str(int(_sample(prom, "fedmq_model_version", **fed)))
            assert (
                int(await shown("accepted")) == 3 * UPDATES_EACH == _sample(prom, "fedmq_updates_accepted_total", **fed)
            )
            assert topic["accepted"] == 3 * UPDATES_EACH
            assert (
                await shown("accuracy") == f"{_sample(prom, 'fedmq_accuracy', **fed):.3f}" == f"{topic['accuracy']:.3f}"
            )
            assert int(await shown("rejected")) == topic["rejected"] == 1
            malformed = _sample(prom, "fedmq_updates_rejected_total", reason="malformed", **fed)
            row = await page.text_content("#rejections tr[data-reason='malformed'] td.num")
            assert row is not None and int(row) == malformed == 1
            assert await shown("agents-online") == "0" == str(int(_sample(prom, "fedmq_agents_online", **fed)))
            assert await shown("agents-offline") == str(int(_sample(prom, "fedmq_agents_offline", **fed)))

            # Each agent's epsilon against its budget, as the devices reported it.
            for a in agents:
                cells = await page.eval_on_selector_all(
                    f"#agents tr[data-agent='{a.agent_id}'] td", "tds => tds.map(t => t.textContent)"
                )
                eps = _sample(prom, "fedmq_agent_epsilon", agent=a.agent_id, **fed)
                assert a.trainer.epsilon == pytest.approx(eps)
                assert cells[1].endswith("stopped") and cells[3] == str(UPDATES_EACH) and cells[5] == f"{eps:.2f}"
                width = await page.eval_on_selector(
                    f"#agents tr[data-agent='{a.agent_id}'] .bar > span", "e => parseFloat(e.style.width)"
                )
                assert width == pytest.approx(100 * eps / 200.0, abs=0.1)
            staleness_count = await page.get_attribute("#staleness-chart", "data-count")
            assert staleness_count is not None
            assert int(staleness_count) == _sample(prom, "fedmq_update_staleness_count", **fed) == 3 * UPDATES_EACH

            # The logs tell the same story: a line per evaluated version, a summary per agent.
            assert any(
                r.levelno == logging.INFO and r.getMessage().startswith(f"version {version}: accuracy ")
                for r in caplog.records
            )
            summaries = [r.getMessage() for r in caplog.records if ": model version " in r.getMessage()]
            assert {s.split(":")[0] for s in summaries} >= {f"agent device-{i}" for i in range(3)}
            assert "epsilon" in agents[0].summary_line() and "of 200" in agents[0].summary_line()

            shot = Path(os.environ.get("FEDMQ_DASHBOARD_SCREENSHOT") or tmp_path / "dashboard.png")
            await page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
        finally:
            await browser.close()
            stop_server.set()
            await asyncio.wait_for(server_task, 60)
