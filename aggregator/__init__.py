"""The aggregator service.

A sans-IO core (:mod:`aggregator.core`, :mod:`aggregator.rules`) and the asyncio service
that owns all I/O (:mod:`aggregator.service`).
"""
