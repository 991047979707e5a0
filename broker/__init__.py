"""Mosquitto configuration and a launcher.

Config files (``*.conf``, ``acl``) live beside this module. The launcher runs Mosquitto when
the binary is on PATH, otherwise an embedded pure-Python broker (amqtt) for development.
"""

from broker.launcher import BROKER_DIR, EmbeddedBroker, MosquittoBroker, free_port, start_broker

__all__ = ["BROKER_DIR", "EmbeddedBroker", "MosquittoBroker", "free_port", "start_broker"]
