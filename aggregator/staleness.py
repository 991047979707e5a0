"""The staleness functions, now part of the shared contract (:mod:`fedmq.staleness`).

Under secure aggregation each device weights its own update, so the functions moved to
``fedmq``; this module keeps the aggregator's imports working.
"""

from fedmq.staleness import StalenessFn, constant, hinge, make_staleness_fn, polynomial

__all__ = ["StalenessFn", "constant", "hinge", "make_staleness_fn", "polynomial"]
