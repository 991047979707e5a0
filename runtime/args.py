"""Argument helpers shared by the role command modules: flags map onto dotted config keys."""

from __future__ import annotations

import argparse
from typing import Any

from fedmq.config import Config, describe, load_config
from runtime.process import broker_url_overrides


def add_common(p: argparse.ArgumentParser) -> None:
    """``--config``, ``--broker``, ``--prefix``, ``--log-level``."""
    p.add_argument("--config", metavar="FILE", help="TOML configuration file (sections broker, aggregator, ...)")
    p.add_argument("--broker", metavar="URL", help="mqtt://[user:password@]host:port (mqtts:// for TLS)")
    p.add_argument("--prefix", help="federation topic prefix (default fedmq/default)")
    p.add_argument("--ca-file", help="CA certificate to verify the broker (TLS)")
    p.add_argument("--cert-file", help="client certificate (TLS)")
    p.add_argument("--key-file", help="client key (TLS)")
    p.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log verbosity (default INFO)",
    )


def flag(p: argparse.ArgumentParser, name: str, key: str, **kw: Any) -> None:
    """Add ``--name`` whose value overrides config ``key`` (default: unset, so file/env win).

    Its help ends with the config key and its default, and says what the key's documentation
    says when the caller gives no help; its metavar is the key's name (``--id AGENT_ID``).
    """
    default, doc = describe(key)
    text = kw.pop("help", None) or doc
    if kw.get("action") in ("store_const", "store_true", "store_false"):
        kw["help"] = f"{text} [config {key}]".strip()
    else:
        if "metavar" not in kw and "choices" not in kw:
            kw["metavar"] = key.rsplit(".", 1)[-1].upper()
        shown = "unset" if default is None or default == "" else default
        kw["help"] = f"{text} [config {key}, default {shown}]".strip().replace("%", "%%")
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
