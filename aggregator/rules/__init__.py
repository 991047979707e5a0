"""Aggregation rules as pure functions over named float32 tensors, one family per module.

No rule imports asyncio or MQTT, and none takes a transport type: they take arrays and
plain numbers, validate their own preconditions and return new arrays.
"""

from aggregator.rules.fedasync import fedasync_mix
from aggregator.rules.fedavg import weighted_mean
from aggregator.rules.fedbuff import fedbuff_step

__all__ = ["fedasync_mix", "fedbuff_step", "weighted_mean"]
