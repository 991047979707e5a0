"""Measuring a run from outside: a process's CPU and memory, and the first message on a topic."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiomqtt


def proc_stats(pid: int) -> dict[str, float]:
    """CPU seconds (user + system), current and peak RSS (MiB) of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    status = Path(f"/proc/{pid}/status").read_text()
    kb = {line.split(":")[0]: int(line.split()[1]) for line in status.splitlines() if line.startswith("Vm")}
    return {"cpu_s": cpu, "rss_mib": kb.get("VmRSS", 0) / 1024, "peak_rss_mib": kb.get("VmHWM", 0) / 1024}


async def first_payload(host: str, port: int, topic: str, limit: float = 60.0) -> bytes:
    """The payload of the first message on ``topic`` (a retained one arrives at once)."""
    async with aiomqtt.Client(host, port) as client, asyncio.timeout(limit):
        await client.subscribe(topic, qos=1)
        async for msg in client.messages:
            if isinstance(msg.payload, (bytes, bytearray)):
                return bytes(msg.payload)
    raise RuntimeError(f"nothing on {topic}")  # pragma: no cover - the loop ends only by returning
