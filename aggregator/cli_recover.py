"""``fedmq recover``: look at an aggregator's state folder and, on the operator's word, decide what to keep.

The aggregator refuses to start on damaged or missing state and names the file (and the
offset); nothing is repaired without this command:

    fedmq recover --checkpoint-dir DIR                 # what is there, and what a start would do
    fedmq recover --checkpoint-dir DIR --rebuild       # a damaged or missing newest checkpoint:
                                                       #   rebuild it from the previous one and the logs
    fedmq recover --checkpoint-dir DIR --accept-loss   # keep the newest consistent state; what is
                                                       #   beyond it is lost, a new run is announced

It takes the aggregator's own configuration (``--config`` and the same flags), because
rebuilding replays the logs through the same core. Files it sets aside go to ``DIR/damaged/``.
Exit status: 0 when the state is (now) consistent, 1 when it is not, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import logging

from aggregator.cli import configure as configure_aggregator
from aggregator.service import AggregatorService
from aggregator.store import Mode, StateStore
from fedmq.errors import ConfigError, StateError
from runtime.args import load_from_args
from runtime.process import setup_logging

log = logging.getLogger("fedmq.aggregator")


def configure(p: argparse.ArgumentParser) -> None:
    """The aggregator's arguments, and the two decisions."""
    configure_aggregator(p)
    what = p.add_mutually_exclusive_group()
    what.add_argument(
        "--rebuild",
        action="store_true",
        help="rebuild a damaged or missing newest checkpoint from the previous checkpoint and the logs (exact "
        "when those are intact)",
    )
    what.add_argument(
        "--accept-loss",
        action="store_true",
        help="keep the newest consistent state (the valid part of a damaged log, the newest intact checkpoint); "
        "updates receipted after it are lost; agents are told of a new run and follow it",
    )


def run(args: argparse.Namespace) -> int:
    """Inspect, and rebuild or accept the loss when asked."""
    setup_logging(args.log_level)
    config = load_from_args(args, "aggregator")
    directory = config.aggregator.checkpoint_dir
    if not directory:
        raise ConfigError("aggregator.checkpoint_dir", "fedmq recover needs the aggregator's --checkpoint-dir")
    print(f"state folder {directory}:")
    for line in StateStore(directory).inventory():
        print(f"  {line}")
    mode: Mode | None = "rebuild" if args.rebuild else "accept-loss" if args.accept_loss else None
    service = AggregatorService(config)
    if mode is None:
        try:
            found = StateStore(directory).open(dry_run=True)
        except StateError as exc:
            print(f"a start would refuse: {exc}")
            print("choose: --rebuild (exact, from the previous checkpoint) or --accept-loss (a rollback)")
            return 1
        for note in found.notes:
            print(f"  note: {note}")
        print("consistent: `fedmq aggregator` resumes from it" if not found.new_run else "empty: a start begins a run")
        return 0
    core = service.startup(mode=mode)
    assert service.store is not None
    service.store.close()
    print(f"{mode}: the state is consistent again at version {core.version}, run {service.run_id}")
    return 0
