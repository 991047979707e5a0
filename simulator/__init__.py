"""The researcher's harness: a broker, an aggregator and N edge agents in one process.

This is the only package that imports both roles (``aggregator`` and ``edge_agent``);
no role imports it. ``fedmq simulate`` and ``fedmq demo`` are its command-line faces.
"""

from simulator.harness import SimConfig, run_simulation

__all__ = ["SimConfig", "run_simulation"]
