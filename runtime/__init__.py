"""The process runtime shared by every fedmq service: not part of the wire contract.

- :mod:`runtime.process`: logging, signals, graceful shutdown, readiness pulses.
- :mod:`runtime.transport`: the MQTT connection (aiomqtt) with TLS, reconnects and backoff.
- :mod:`runtime.args`: command-line flags that map onto dotted config keys.

Layers, lowest first: ``fedmq`` (the contract) < ``models`` < ``runtime`` < ``broker`` <
``edge_agent`` | ``aggregator`` < ``simulator`` < ``cli``. A package imports only from layers
below it; ``.importlinter`` states this and CI checks it.
"""
