"""Argument helpers shared by the role command modules: flags map onto dotted config keys."""

from __future__ import annotations

import argparse
from typing import Any

from fedmq.config import Config, load_config
from runtime.process import broker_url_overrides


def add_common(p: argparse.ArgumentParser) -> None:
    """``--config``, ``--broker``, ``--prefix``, ``--log-level``."""
    p.add_argument("--config", metavar="FILE", help="TOML configuration file (sections broker, aggregator, ...)")
    p.add_argument("--broker", metavar="URL", help="mqtt://[user:password@]host:port (mqtts:// for TLS)")
    p.add_argument("--prefix", help="federation topic prefix (default fedmq/default)")
    p.add_argument("--ca-file", help="CA certificate to verify the broker (TLS)")
    p.add_argument("--cert-file", help="client certificate (TLS)")
    p.add_argument("--key-file", help="client key (TLS)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def flag(p: argparse.ArgumentParser, name: str, key: str, **kw: Any) -> None:
    """Add ``--name`` whose value overrides config ``key`` (default: unset, so file/env win)."""
    p.add_argument(name, dest=f"cfg:{key}", default=None, **kw)


def load_from_args(args: argparse.Namespace, role: str) -> Config:
    """Load the config: file, env, then the flags given on the command line."""
    overrides: dict[str, Any] = {}
    if args.broker:
        overrides.update(broker_url_overrides(args.broker))
    for name, key in (
        ("prefix", "prefix"),
        ("ca_file", "broker.ca_file"),
        ("cert_file", "broker.cert_file"),
        ("key_file", "broker.key_file"),
    ):
        if getattr(args, name, None) is not None:
            overrides[key] = getattr(args, name)
    if args.ca_file or args.cert_file:
        overrides["broker.tls"] = True
    for dest, value in vars(args).items():
        if dest.startswith("cfg:") and value is not None:
            overrides[dest[4:]] = value
    return load_config(args.config, overrides=overrides, role=role)
