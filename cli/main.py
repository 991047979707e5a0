"""The thin ``fedmq`` command line.

Each subcommand lives with its role and is imported only when it runs (so ``fedmq agent``
loads neither the aggregator nor scikit-learn). A command module exposes
``configure(parser)`` and ``run(args) -> int``; this file names them by dotted path and
imports no role package itself.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from fedmq import __version__
from fedmq.errors import ConfigError, StateError
from runtime.extras import require

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("simulator.cli_demo", "broker + aggregator + devices on an example task, with a live progress bar"),
    "simulate": ("simulator.cli_simulate", "N simulated agents in one process: compare rules, DP, stragglers"),
    "population": ("simulator.cli_population", "privacy against utility for thousands of devices, in virtual time"),
    "broker": ("broker.cli", "run Mosquitto (or the embedded broker) with the project's configuration"),
    "cluster": ("broker.cli_cluster", "a local NATS cluster with MQTT and JetStream on every node (development)"),
    "aggregator": ("aggregator.cli", "run the aggregator service"),
    "recover": ("aggregator.cli_recover", "inspect an aggregator's state folder and choose what to keep after damage"),
    "agent": ("edge_agent.cli", "run one edge agent against a broker and a local data source"),
    "watch": ("cli.watch", "a live terminal view of a federation's metrics (any identity may read them)"),
    "predict": ("edge_agent.cli_predict", "predict with an exported ONNX global model (no torch needed), or a WAV"),
    "data": ("models.cli_data", "write per-device data folders from a task or your own data; speak a keyword"),
}


def build_parser(command: str | None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported to add its arguments."""
    parser = argparse.ArgumentParser(prog="fedmq", description="Asynchronous federated learning over MQTT.")
    parser.add_argument("--version", action="version", version=f"fedmq {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, text) in COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text)
        if name == command:
            importlib.import_module(module).configure(p)
            _show_defaults(p)
    return parser


def _require_extras(args: argparse.Namespace) -> None:
    """Name the extra a command needs before it starts (the device install has none of them)."""
    command = args.command
    if command in ("demo", "simulate", "population"):
        require("demo", key=command, why=f"fedmq {command}", modules=("sklearn",))
    if command == "demo" or getattr(args, "plot", None):
        require(
            "demo", key="--plot" if command != "demo" else command, why="the accuracy plot", modules=("matplotlib",)
        )
    if getattr(args, "broker", None) == "embedded" and command in ("simulate", "demo"):
        require("demo", key="--broker", why="the embedded broker", modules=("amqtt",))
    if command == "data" and getattr(args, "data_command", None) == "split":
        require("demo", key="data split", why="the example tasks' data", modules=("sklearn",))


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Append ``(default X)`` to each option's help that has a default and does not state one."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _show_defaults(sub)
            continue
        default = action.default
        if not action.option_strings or action.help in (None, argparse.SUPPRESS) or default in (None, False, True):
            continue
        if "default" not in action.help and default is not argparse.SUPPRESS:
            action.help += " (default %(default)s)"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedmq`` console script."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in args_list if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(args_list)
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        _require_extras(args)
        return int(module.run(args))
    except (ConfigError, StateError) as exc:
        print(f"fedmq {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
