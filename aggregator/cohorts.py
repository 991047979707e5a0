"""Secure aggregation's settings from the configuration: one place for the aggregator and a site.

Both serve SecAgg+ cohorts (:class:`~fedmq.secagg.server.CohortManager`) to their devices: the
aggregator applies each cohort's sum itself, a site forwards it to its root (docs/scale-out.md).
"""

from __future__ import annotations

import logging
from dataclasses import replace

from fedmq.config import AggregatorConfig, BrokerConfig
from fedmq.errors import ConfigError
from fedmq.secagg import ddp
from fedmq.secagg.crypto import Verifier
from fedmq.secagg.messages import Params
from fedmq.secagg.server import SecAggSettings

log = logging.getLogger("fedmq.aggregator")


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


def with_distributed_dp(cfg: AggregatorConfig, settings: SecAggSettings, n_params: int) -> SecAggSettings:
    """``settings`` announcing distributed DP's noise for ``aggregator.secagg.dp_epsilon``, if set; logged.

    The noise (:func:`fedmq.secagg.ddp.calibrate`, Kairouz, Liu and Steinke, ICML 2021) is what
    each sum of at least the survivor floor's uploads must carry for a device in
    ``max_participation`` sums to have that epsilon at ``dp_delta``, for a model of ``n_params``.
    An epsilon no noise reaches is a :class:`ConfigError` naming the key.
    """
    sa = cfg.secagg
    if sa.dp_epsilon is None:
        return settings
    survivors = sa.survivors_for(settings.cohort_size)
    try:
        calib = ddp.calibrate(
            sa.dp_epsilon, cfg.dp_delta, releases=cfg.max_participation, survivors=survivors,
            summands=settings.members, dim=n_params + 1, clip=ddp.input_clip(sa.clip_norm), bits=sa.bits,
        )  # fmt: skip
    except ValueError as exc:
        raise ConfigError("aggregator.secagg.dp_epsilon", str(exc)) from None
    log.info(
        "distributed DP: each sum of >= %d uploads carries discrete Gaussian noise of std %.4g "
        "(z = %.3f on the clip %.3g); a device in %d sums has epsilon %.3f at delta %g",
        survivors, calib.params.central_stddev, calib.noise_multiplier, calib.params.clip, cfg.max_participation,
        calib.epsilon, cfg.dp_delta,
    )  # fmt: skip
    params = replace(settings.params, dp_stddev=calib.params.central_stddev, dp_survivors=survivors)
    return replace(settings, params=params)


def federation_verifier(broker: BrokerConfig) -> Verifier | None:
    """The federation CA that devices' signed keys must verify against, in a TLS deployment with client certificates."""
    if not (broker.ca_file and broker.cert_file):
        return None
    try:
        return Verifier.from_file(broker.ca_file)
    except (OSError, ValueError) as exc:
        raise ConfigError("broker.ca_file", f"cannot load the federation CA: {exc}") from None


__all__ = ["cohort_settings", "federation_verifier", "with_distributed_dp"]
