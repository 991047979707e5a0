"""Following the aggregator's federation plan (:class:`fedmq.messages.Plan`).

The plan is authoritative for what it sets: a fleet is configured in one place. A device keeps
its own value only for the keys it lists in ``agent.keep_local`` (``local_epochs``,
``batch_size``: what its compute and memory allow), and ignores the plan altogether with
``agent.follow_plan = false``. The plan's clip and noise are the ones the aggregator's
``not_private`` check expects, so a device adopting a planned noise turns local DP on.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from fedmq.config import AgentConfig, PrivacyConfig
from fedmq.messages import Plan

AGENT_KEYS = ("local_epochs", "lr", "batch_size", "compression", "topk_fraction")
PRIVACY_KEYS = ("clip_norm", "noise_multiplier")


def follow(
    agent: AgentConfig, privacy: PrivacyConfig, plan: Plan | None
) -> tuple[AgentConfig, PrivacyConfig, list[str]]:
    """The settings to train with under ``plan``, and what differs from the device's own (``key a -> b``).

    Args:
        agent: the device's own agent section (never modified).
        privacy: its privacy section.
        plan: the plan announced with the model (``None``: none).
    """
    if plan is None or not agent.follow_plan:
        return agent, privacy, []
    kept = {k.strip() for k in agent.keep_local.split(",") if k.strip()}
    planned = plan.items()
    changes: list[str] = []
    agent_changes: dict[str, Any] = {}
    for key in AGENT_KEYS:
        if key in planned and key not in kept and getattr(agent, key) != planned[key]:
            agent_changes[key] = planned[key]
            changes.append(f"{key} {getattr(agent, key)} -> {planned[key]}")
    privacy_changes: dict[str, Any] = {}
    for key in PRIVACY_KEYS:
        if key in planned and getattr(privacy, key) != planned[key]:
            privacy_changes[key] = planned[key]
            changes.append(f"{key} {getattr(privacy, key)} -> {planned[key]}")
    if planned.get("noise_multiplier", 0) > 0 and not privacy.enabled:
        privacy_changes["enabled"] = True
        changes.append("local DP off -> on")
    return replace(agent, **agent_changes), replace(privacy, **privacy_changes), changes
