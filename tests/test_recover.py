"""Tier 2: damaged and missing state through the commands an operator types.

``fedmq aggregator`` refuses to start (exit 2) and names the file; ``fedmq recover`` shows what
is there and, when asked, rebuilds exactly (a damaged newest checkpoint, from the previous one
and the logs) or accepts a loss (keeps the newest consistent state, announces a new run);
``--fresh`` begins a new run and moves the old state aside. Nothing is deleted on the way."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from aggregator.service import AggregatorService
from aggregator.wal import WalScan
from cli.main import main
from fedmq.config import AggregatorConfig, Config
from tests.test_seams import Recorder, feed, update_bytes

FLAGS = ["--buffer-size", "2", "--max-staleness", "100", "--checkpoint-every", "2"]


def config(directory: Path) -> Config:
    agg = AggregatorConfig(buffer_size=2, max_staleness=100, checkpoint_every=2, checkpoint_dir=str(directory))
    return Config(aggregator=agg).validate()


async def filled(directory: Path, updates: int) -> tuple[int, int]:
    """Run an aggregator on ``directory`` for ``updates`` updates (kill -9 at the end); its (version, accepted)."""
    svc = AggregatorService(config(directory))
    svc.startup()
    rec = Recorder()
    for i in range(updates):
        assert svc.core is not None
        await feed(svc, rec, f"a{i % 3}", update_bytes(svc, f"a{i % 3}", i + 1, 0.01, base=svc.core.version))
    assert svc.core is not None
    return svc.core.version, svc.core.stats.accepted


def started(directory: Path) -> tuple[int, int, str | None]:
    svc = AggregatorService(config(directory))
    core = svc.startup()
    assert svc.store is not None
    svc.store.close()
    return core.version, core.stats.accepted, svc.run_id


def cli(*args: str) -> int:
    return main([*args, "--log-level", "ERROR"])


def flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x10
    path.write_bytes(bytes(data))


async def test_a_damaged_newest_checkpoint_is_refused_then_rebuilt_exactly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    version, accepted = await filled(tmp_path, 11)  # checkpoints at versions 2 and 4, a log after
    _, _, run = started(tmp_path)
    newest = max(tmp_path.glob("checkpoint.*"), key=lambda p: int(p.suffix[1:]))
    flip(newest, len(newest.read_bytes()) // 2)
    assert cli("aggregator", "--checkpoint-dir", str(tmp_path), *FLAGS) == 2
    err = capsys.readouterr().err
    assert str(newest) in err and "SHA-256" in err and "--rebuild" in err
    assert cli("recover", "--checkpoint-dir", str(tmp_path), *FLAGS) == 1  # looks, changes nothing
    out = capsys.readouterr().out
    assert "DAMAGED" in out and newest.name in out
    assert cli("recover", "--checkpoint-dir", str(tmp_path), *FLAGS, "--rebuild") == 0
    assert started(tmp_path) == (version, accepted, run)  # exact, and the same run: nothing was lost
    assert [p.name.split(".20")[0] for p in (tmp_path / "damaged").iterdir()] == [newest.name]  # the evidence


async def test_a_damaged_log_record_is_refused_and_accepting_the_loss_keeps_what_precedes_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await filled(tmp_path, 11)  # the last checkpoint at version 4 (8 updates): 3 records after it
    _, _, old_run = started(tmp_path)
    wal = max(tmp_path.glob("wal.*"), key=lambda p: int(p.suffix[1:]))
    records = list(WalScan(wal).records())
    assert len(records) >= 2
    flip(wal, records[1].offset + 20)
    assert cli("aggregator", "--checkpoint-dir", str(tmp_path), *FLAGS) == 2
    assert f"{wal} at offset {records[1].offset}" in capsys.readouterr().err
    damaged = wal.read_bytes()
    assert cli("recover", "--checkpoint-dir", str(tmp_path), *FLAGS, "--accept-loss") == 0
    _, accepted, run = started(tmp_path)
    assert run != old_run  # a confirmed rollback is a new run: agents follow it
    kept = [p for p in (tmp_path / "damaged").iterdir()]
    assert len(kept) == 1 and kept[0].read_bytes() == damaged  # the whole damaged file, as evidence
    assert accepted >= 1  # the checkpoint and the record before the damage


async def test_missing_state_refuses_to_start_and_fresh_moves_it_aside(tmp_path: Path, capsys: Any) -> None:
    await filled(tmp_path, 6)
    for p in tmp_path.glob("wal.*"):
        p.unlink()
    assert cli("aggregator", "--checkpoint-dir", str(tmp_path), *FLAGS) == 2
    assert "missing" in capsys.readouterr().err
    svc = AggregatorService(config(tmp_path), fresh=True)
    core = svc.startup()
    assert core.version == 0 and core.stats.accepted == 0
    aside = list(tmp_path.glob("discarded-*"))
    assert len(aside) == 1 and any(p.name.startswith("checkpoint.") for p in aside[0].iterdir())


async def test_recover_lists_every_damaged_file_even_a_log_whose_header_is_gone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The bit-flip soak leaves damage anywhere, also in the previous generation, which a start
    does not read. `fedmq recover` must still show every file and what is wrong with it."""
    await filled(tmp_path, 11)
    started(tmp_path)  # a clean start: both kept generations are there
    wals = sorted(tmp_path.glob("wal.*"), key=lambda p: int(p.suffix[1:]))
    ckpts = sorted(tmp_path.glob("checkpoint.*"), key=lambda p: int(p.suffix[1:]))
    assert len(wals) == 2 and len(ckpts) == 2
    flip(wals[-1], 0)  # the magic of the current log
    flip(ckpts[0], len(ckpts[0].read_bytes()) // 2)  # the previous generation's checkpoint
    assert cli("recover", "--checkpoint-dir", str(tmp_path), *FLAGS) == 1
    out = capsys.readouterr().out
    damaged = [line for line in out.splitlines() if "DAMAGED" in line]
    assert any(wals[-1].name in line and "offset 0" in line for line in damaged), out
    assert any(ckpts[0].name in line for line in damaged), out
    assert "a start would refuse" in out and str(wals[-1]) in out


def test_a_new_run_is_a_warning_only_when_it_replaces_one(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A first start in an empty folder is routine; --fresh (or --accept-loss) sets a run aside and
    makes the agents drop what they hold: that is worth a warning."""
    caplog.set_level(logging.INFO, logger="fedmq.aggregator")

    def levels() -> list[int]:
        found = [r.levelno for r in caplog.records if "a new federation run begins" in r.getMessage()]
        caplog.clear()
        return found

    started(tmp_path)
    assert levels() == [logging.INFO]
    started(tmp_path)  # resumed: no new run
    assert levels() == []
    svc = AggregatorService(config(tmp_path), fresh=True)
    svc.startup()
    assert svc.store is not None
    svc.store.close()
    assert levels() == [logging.WARNING]
