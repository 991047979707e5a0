"""fedmq: asynchronous federated learning for IoT edge devices over MQTT.

This package is the shared contract between the roles: topic names, the message
schema, the msgpack tensor codec, configuration and the thin ``fedmq`` command line.
It imports no role package (``edge_agent``, ``aggregator``, ``simulator``).
"""

__version__ = "0.1.0"
SCHEMA_VERSION = 1
"""Version of the wire schema; every message carries it under the key ``schema``."""
