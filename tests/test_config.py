"""Tier 1: configuration loading (file + env + flags), validation naming the key, topics."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedmq.config import load_config
from fedmq.errors import ConfigError
from fedmq.topics import Topics, validate_agent_id
from runtime.process import broker_url_overrides


def test_precedence_file_then_env_then_flags(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text(
        'prefix = "fedmq/site"\n[broker]\nport = 1000\nhost = "h"\n[aggregator]\nbuffer_size = 4\n'
        '[aggregator.staleness]\nfunction = "hinge"\n'
    )
    c = load_config(
        f,
        env={"FEDMQ_BROKER__PORT": "2000", "FEDMQ_AGGREGATOR__SERVER_LR": "0.5"},
        overrides={"broker.port": 3000, "aggregator.rule": None},
    )
    assert (c.prefix, c.broker.host, c.broker.port) == ("fedmq/site", "h", 3000)
    assert c.aggregator.buffer_size == 4 and c.aggregator.server_lr == 0.5
    assert c.aggregator.staleness.function == "hinge" and c.aggregator.rule == "fedbuff"
    with pytest.raises(AttributeError):
        c.broker.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"aggregator.buffer_size": 0}, "aggregator.buffer_size"),
        ({"aggregator.rule": "fedprox"}, "aggregator.rule"),
        ({"aggregator.staleness.function": "exp"}, "aggregator.staleness.function"),
        ({"broker.port": 70000}, "broker.port"),
        ({"broker.port": "eighty"}, "broker.port"),
        ({"broker.ca_file": "/nonexistent/ca.pem"}, "broker.ca_file"),
        ({"agent.agent_id": "a/b"}, "agent.agent_id"),
        ({"agent.agent_id": "a+"}, "agent.agent_id"),
        ({"agent.agent_id": "#"}, "agent.agent_id"),
        ({"privacy.delta": 2}, "privacy.delta"),
        ({"aggregator.bufer_size": 3}, "aggregator.bufer_size"),
        ({"prefix": "bad/+/prefix"}, "federation.prefix"),
    ],
)
def test_bad_config_fails_fast_naming_the_key(overrides: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env={}, overrides=overrides)
    assert info.value.key == key
    assert key in str(info.value)


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text("[broker\n")
    with pytest.raises(ConfigError, match=r"not valid TOML"):
        load_config(tmp_path / "bad.toml", env={})
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "none.toml", env={})


def test_broker_url() -> None:
    o = broker_url_overrides("mqtts://dev%2F1:s3cr%40t@broker.local")
    assert o == {
        "broker.host": "broker.local",
        "broker.port": 8883,
        "broker.tls": True,
        "broker.username": "dev/1",
        "broker.password": "s3cr@t",
    }
    assert broker_url_overrides("mqtt://10.0.0.2:1884")["broker.port"] == 1884
    with pytest.raises(ConfigError, match=r"broker\.url"):
        broker_url_overrides("http://x")


def test_topics() -> None:
    t = Topics("fedmq/site")
    assert t.update("a") == "fedmq/site/update/a" and t.update_wildcard == "fedmq/site/update/+"
    assert t.agent_of("fedmq/site/update/dev-1", "update") == "dev-1"
    assert t.agent_of("fedmq/site/update/a/b", "update") is None
    assert t.agent_of("fedmq/other/update/a", "update") is None
    with pytest.raises(ConfigError):
        validate_agent_id("server")
