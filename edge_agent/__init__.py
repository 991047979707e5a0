"""The edge agent.

Local training, the privacy pipeline (clip -> noise, with an accountant) and the asyncio
MQTT service. Needs numpy, msgpack, aiomqtt and dp-accounting; never torch.
"""
