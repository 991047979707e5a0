"""The sample configs and systemd units in contrib/ are what the docs say and what the code accepts."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

from aggregator.service import federation_plan
from cli.main import build_parser
from fedmq.config import load_config
from fedmq.messages import Plan

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "contrib"


def _tls_files(tmp_path: Path) -> dict[str, str]:
    out = {}
    for key in ("ca_file", "cert_file", "key_file"):
        f = tmp_path / key
        f.write_text("placeholder")
        out[f"broker.{key}"] = str(f)
    return out


def test_sample_agent_config_loads_and_keeps_only_what_a_device_may(tmp_path: Path) -> None:
    cfg = load_config(DEPLOY / "config" / "agent.toml", env={}, overrides=_tls_files(tmp_path), role="agent")
    assert cfg.broker.tls and cfg.agent.agent_id == "pi-kitchen" and cfg.agent.keep_local == "batch_size"
    assert cfg.privacy.epsilon_budget == 10.0 and cfg.prefix == "fedmq/home"


def test_sample_aggregator_config_loads_and_announces_its_plan(tmp_path: Path) -> None:
    cfg = load_config(DEPLOY / "config" / "aggregator.toml", env={}, overrides=_tls_files(tmp_path), role="aggregator")
    assert federation_plan(cfg.aggregator) == Plan(
        local_epochs=2, lr=0.1, batch_size=16, clip_norm=2.0, noise_multiplier=0.3, compression="fp16"
    )
    assert cfg.aggregator.http == "127.0.0.1:8700" and cfg.aggregator.buffer_size == 3


def test_sample_broker_config_makes_the_deployment_it_describes(tmp_path: Path) -> None:
    from broker.cli import _init
    from broker.pki import load_registry

    args = build_parser("broker").parse_args(
        ["broker", "init", str(tmp_path), "--config", str(DEPLOY / "config" / "broker.toml"), "--group", "",
         "--data-dir", str(tmp_path / "data")]
    )  # fmt: skip
    assert _init(args) == 0
    reg = load_registry(tmp_path)
    assert reg is not None and reg.prefix == "fedmq/home" and reg.port == 8883
    assert set(reg.active("agent")) == {"pi-kitchen", "pi-garage", "pi-attic"}


def test_an_unknown_key_in_the_broker_config_is_named(tmp_path: Path) -> None:
    from broker.cli import init_options
    from fedmq.errors import ConfigError

    bad = tmp_path / "b.toml"
    bad.write_text("[init]\nagnets = 3\n")
    args = build_parser("broker").parse_args(["broker", "init", str(tmp_path / "d"), "--config", str(bad)])
    with pytest.raises(ConfigError) as caught:
        init_options(args)
    assert caught.value.key == "init.agnets"


@pytest.mark.parametrize("unit", ["fedmq-agent.service", "fedmq-aggregator.service", "fedmq-broker.service"])
def test_systemd_units_run_hardened_as_their_own_user(unit: str) -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(DEPLOY / "systemd" / unit)
    service = parser["Service"]
    assert service["User"] != "root" and service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict" and service["ProtectHome"] == "yes"
    assert "StateDirectory" in service and service["CapabilityBoundingSet"] == ""
    command = service["ExecStart"].split()
    if unit != "fedmq-broker.service":
        assert command[1] in ("agent", "aggregator") and command[2] == "--config"
        assert service["KillSignal"] == "SIGTERM"  # the graceful shutdown both services implement
        assert command[3] == f"/etc/fedmq/{command[1]}.toml"
    else:
        assert "ExecReload" in service  # `systemctl reload` after init adds a device
    if shutil.which("systemd-analyze"):
        done = subprocess.run(["systemd-analyze", "verify", str(DEPLOY / "systemd" / unit)],
                              capture_output=True, text=True)  # fmt: skip
        assert "Unknown key" not in done.stderr and "Unknown section" not in done.stderr, done.stderr
