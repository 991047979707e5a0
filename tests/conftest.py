"""Fixtures: a real Mosquitto per test module on a free loopback port, unique topic prefixes,
and a runner for ``async def`` tests (no plugin needed)."""

from __future__ import annotations

import asyncio
import inspect
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from broker.launcher import MosquittoBroker

ASYNC_TEST_TIMEOUT = 120.0

# Every `fedmq aggregator` a test starts serves its dashboard on a free port, never on the fixed
# default 127.0.0.1:8700: several run at once, and something else on this machine may hold it.
os.environ.setdefault("FEDMQ_AGGREGATOR__HTTP", "127.0.0.1:0")


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run ``async def`` tests on a fresh event loop, bounded by a timeout."""
    func = pyfuncitem.obj
    if not inspect.iscoroutinefunction(func):
        return None
    kwargs = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}

    async def bounded() -> Any:
        async with asyncio.timeout(ASYNC_TEST_TIMEOUT):
            return await func(**kwargs)

    asyncio.run(bounded())
    return True


def _mosquitto_available() -> bool:
    return bool(shutil.which("mosquitto") or os.path.exists("/usr/sbin/mosquitto"))


def require_mosquitto() -> None:
    """Fail (or, with FEDMQ_SKIP_BROKER_TESTS=1, skip) when the mosquitto binary is missing."""
    if not _mosquitto_available():
        if os.environ.get("FEDMQ_SKIP_BROKER_TESTS") == "1":
            pytest.skip("mosquitto not installed and FEDMQ_SKIP_BROKER_TESTS=1")
        pytest.fail("the mosquitto binary is required for broker tests (apt-get install mosquitto)")


@pytest.fixture(scope="module")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    """A real Mosquitto with ``broker/mosquitto.dev.conf`` on a free loopback port.

    Missing Mosquitto fails the test (CI installs it); set FEDMQ_SKIP_BROKER_TESTS=1 to skip locally.
    """
    require_mosquitto()
    broker = MosquittoBroker(workdir=tmp_path_factory.mktemp("mosquitto"))
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def prefix() -> str:
    """A topic prefix no other test uses (tests share a broker)."""
    return f"fedmq/t{uuid.uuid4().hex[:12]}"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """With FEDMQ_REQUIRE_ALL=1 (CI), a skipped test fails the run: broker and torch tests must run."""
    if os.environ.get("FEDMQ_REQUIRE_ALL") != "1":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped and exitstatus == 0:
        reporter.write_line(f"FEDMQ_REQUIRE_ALL=1: {len(skipped)} test(s) skipped; failing the run", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def speech_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """espeak-ng present (skipped otherwise, which FEDMQ_REQUIRE_ALL=1 turns into a failure) and a
    fresh feature cache for this session, so that no earlier build's cached households are reused."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    old = os.environ.get("FEDMQ_CACHE")
    path = str(tmp_path_factory.mktemp("fedmq-cache"))
    os.environ["FEDMQ_CACHE"] = path
    yield path
    if old is None:
        os.environ.pop("FEDMQ_CACHE", None)
    else:
        os.environ["FEDMQ_CACHE"] = old


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts; any still running at the end is killed."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(30)
