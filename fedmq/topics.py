"""MQTT topic layout of one federation.

All topics live under a federation prefix (default ``fedmq/default``)::

    {prefix}/model                global model, retained, QoS 1, published by the aggregator
    {prefix}/update/{agent_id}    one agent's updates, QoS 1, not retained
    {prefix}/status/{agent_id}    agent liveness, retained, QoS 1, with an MQTT Will
    {prefix}/server/status        aggregator liveness, retained, QoS 1, with an MQTT Will
    {prefix}/metrics              aggregator metrics, retained, QoS 0
    {prefix}/receipt/{agent_id}   the aggregator's answer to each update, QoS 1, not retained
    {prefix}/secagg/up/{agent_id}   secure aggregation: a device's protocol messages, QoS 1
    {prefix}/secagg/down/{agent_id} secure aggregation: the aggregator's messages to one device, QoS 1

See ``docs/protocol.md`` for the payload of each topic.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fedmq.errors import ConfigError

_ID_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_PREFIX_RE = re.compile(r"[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*")
# Always matched whole (``fullmatch``): with ``match`` and ``$``, "agent-1\n" passed.


def is_agent_id(value: object) -> bool:
    """True if ``value`` is a usable agent id (see :func:`validate_agent_id`)."""
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None and value != "server"


def validate_agent_id(agent_id: str, *, key: str = "agent.agent_id") -> str:
    """Return ``agent_id`` if it can be one MQTT topic level, else raise :class:`ConfigError`.

    Ids are 1-64 characters of ``[A-Za-z0-9_.-]``: no ``/`` (a second level), no ``+`` or
    ``#`` (wildcards, which Mosquitto's ``%u``/``%c`` ACL patterns must never see).
    """
    if not isinstance(agent_id, str) or _ID_RE.fullmatch(agent_id) is None:
        raise ConfigError(key, f"agent id {agent_id!r} must be 1-64 characters of [A-Za-z0-9_.-]")
    if agent_id == "server":
        raise ConfigError(key, "agent id 'server' is reserved")
    return agent_id


@dataclass(frozen=True)
class Topics:
    """Names of every topic of one federation."""

    prefix: str = "fedmq/default"

    def __post_init__(self) -> None:
        if _PREFIX_RE.fullmatch(self.prefix) is None:
            raise ConfigError("federation.prefix", f"{self.prefix!r} is not a valid topic prefix")

    @property
    def model(self) -> str:
        """Global model (retained)."""
        return f"{self.prefix}/model"

    def update(self, agent_id: str) -> str:
        """Update topic of one agent."""
        return f"{self.prefix}/update/{agent_id}"

    @property
    def update_wildcard(self) -> str:
        """Subscription that matches every agent's update topic."""
        return f"{self.prefix}/update/+"

    def receipt(self, agent_id: str) -> str:
        """Where the aggregator answers one agent's updates (accepted or rejected, by ``seq``)."""
        return f"{self.prefix}/receipt/{agent_id}"

    def status(self, agent_id: str) -> str:
        """Status topic of one agent (retained, with a Will)."""
        return f"{self.prefix}/status/{agent_id}"

    @property
    def status_wildcard(self) -> str:
        """Subscription that matches every agent's status topic."""
        return f"{self.prefix}/status/+"

    @property
    def server_status(self) -> str:
        """Aggregator liveness (retained, with a Will)."""
        return f"{self.prefix}/server/status"

    @property
    def metrics(self) -> str:
        """Aggregator metrics (retained)."""
        return f"{self.prefix}/metrics"

    def secagg_up(self, agent_id: str) -> str:
        """Where a device sends its secure-aggregation messages."""
        return f"{self.prefix}/secagg/up/{agent_id}"

    @property
    def secagg_up_wildcard(self) -> str:
        """Subscription that matches every device's secure-aggregation messages."""
        return f"{self.prefix}/secagg/up/+"

    def secagg_down(self, agent_id: str) -> str:
        """Where the aggregator sends one device its secure-aggregation messages."""
        return f"{self.prefix}/secagg/down/{agent_id}"

    def agent_of(self, topic: str, kind: str) -> str | None:
        """Return the agent id of ``{prefix}/{kind}/{agent_id}``, or ``None`` if it is not one.

        A topic of that kind whose last level is not a valid id gives ``None`` too; use
        :meth:`kind_of` to tell it from a topic of another kind.
        """
        rest = self.kind_of(topic, kind)
        return rest if rest is not None and is_agent_id(rest) else None

    def kind_of(self, topic: str, kind: str) -> str | None:
        """The last level of ``{prefix}/{kind}/{anything}`` (valid id or not), else ``None``."""
        head = f"{self.prefix}/{kind}/"
        return topic[len(head) :] if topic.startswith(head) else None
