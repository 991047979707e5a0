"""Secure aggregation for asynchronous, buffered federated learning over a broker.

SecAgg+ (Bell et al., CCS 2020, after Bonawitz et al., CCS 2017) with one cohort per FedBuff
buffer: the aggregator learns the sum of a cohort's weighted updates and nothing about any one
of them. Both sides of the protocol are sans-IO state machines (:mod:`fedmq.secagg.client`,
:mod:`fedmq.secagg.server`) over the wire messages of :mod:`fedmq.secagg.messages`; they live
here, in the shared contract, because a protocol is one thing with two ends (as in h11), and
the agent and the aggregator each import only their own end. The threat model and what it
does not cover are in ``docs/security.md``; the messages in ``docs/protocol.md``.
"""
