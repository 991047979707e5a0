"""Secure aggregation's settings from the configuration: one place for the aggregator and a site.

Both serve SecAgg+ cohorts (:class:`~fedmq.secagg.server.CohortManager`) to their devices: the
aggregator applies each cohort's sum itself, a site forwards it to its root (docs/scale-out.md).
"""

from __future__ import annotations

from dataclasses import replace

from fedmq.config import AggregatorConfig, BrokerConfig
from fedmq.errors import ConfigError
from fedmq.secagg.crypto import Verifier
from fedmq.secagg.messages import Params
from fedmq.secagg.server import SecAggSettings


def cohort_settings(cfg: AggregatorConfig) -> SecAggSettings:
    """Cohort size, overselection, threshold, timeouts and the announced :class:`Params` (no distributed DP)."""
    sa = cfg.secagg
    params = Params(
        bits=sa.bits,
        clip_norm=sa.clip_norm,
        clip_range=sa.clip_range,
        staleness=cfg.staleness.function,
        staleness_a=cfg.staleness.a,
        staleness_b=cfg.staleness.b,
        max_staleness=cfg.max_staleness,
    )
    settings = SecAggSettings(
        cohort_size=sa.cohort_size or cfg.buffer_size,
        overselect=sa.overselect,
        threshold=sa.threshold,
        degree=sa.degree,
        min_cohort=sa.min_cohort,
        form_wait=sa.form_wait,
        timeout=sa.timeout,
        max_cohorts=sa.max_cohorts,
    )
    return replace(settings, params=params)


def federation_verifier(broker: BrokerConfig) -> Verifier | None:
    """The federation CA that devices' signed keys must verify against, in a TLS deployment with client certificates."""
    if not (broker.ca_file and broker.cert_file):
        return None
    try:
        return Verifier.from_file(broker.ca_file)
    except (OSError, ValueError) as exc:
        raise ConfigError("broker.ca_file", f"cannot load the federation CA: {exc}") from None


__all__ = ["cohort_settings", "federation_verifier"]
