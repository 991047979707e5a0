"""Mosquitto configuration (``*.conf``, ``acl``) and a launcher: Mosquitto when the binary is
on PATH, otherwise an embedded pure-Python broker (amqtt) for development and demos."""

from broker.launcher import BROKER_DIR, BrokerHandle, EmbeddedBroker, MosquittoBroker, free_port, start_broker

__all__ = ["BROKER_DIR", "BrokerHandle", "EmbeddedBroker", "MosquittoBroker", "free_port", "start_broker"]
