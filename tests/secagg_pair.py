"""A cohort of client sessions wired to a cohort manager in memory (h11's ``ConnectionPair``, for SecAgg).

Messages go through their wire encoding and the strict decoders both ways, so what the tests
drive is what the broker would carry. Devices can be made to vanish before they send a given
kind of message (a dropout at that phase), and a test can rewrite any message in flight.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedmq.secagg import crypto
from fedmq.secagg.client import ClientSession, Finished, Ignored, NeedInput, Refused, Send
from fedmq.secagg.messages import CheckIn, CohortMsg, DownMessage, UpMessage, decode_down, decode_up
from fedmq.secagg.server import Abandoned, CohortManager, Reject, SecAggSettings, SendTo, Unmasked, done_messages
from tests.cipher_rng import CipherRng


@dataclass
class Fleet:
    """``n`` devices and one aggregator's cohort manager, in memory."""

    n: int
    settings: SecAggSettings
    n_values: int = 51
    signers: dict[str, crypto.Signer] = field(default_factory=dict)
    verifier: crypto.Verifier | None = None
    seed: int = 0
    now: float = 0.0
    up_filter: Callable[[str, UpMessage], UpMessage | None] | None = None
    """Rewrites (or, returning None, swallows) what a device sends."""
    down_filter: Callable[[str, DownMessage], DownMessage | None] | None = None

    def __post_init__(self) -> None:
        self.agents = [f"dev-{i:02d}" for i in range(self.n)]
        self.manager = CohortManager(self.settings, n_values=self.n_values, verifier=self.verifier)
        self.sessions: dict[str, ClientSession] = {}
        rng = CipherRng(self.seed)
        self.inputs = {a: rng.uniform(-0.5, 0.5, self.n_values - 1) for a in self.agents}
        self.weights = {a: float(rng.uniform(0.2, 1.0)) for a in self.agents}
        self.dead: set[str] = set()
        self.die_before: dict[str, str] = {}
        """agent -> message kind: the device vanishes instead of sending it."""
        self.tell_offline = True
        """Report a vanished device offline to the manager (like its MQTT Will), or leave it to timeouts."""
        self.rejects: list[Reject] = []
        self.results: list[Unmasked | Abandoned] = []
        self.client_events: dict[str, list[Any]] = {a: [] for a in self.agents}
        self._queue: deque[tuple[str, str, bytes]] = deque()

    # --- driving -------------------------------------------------------------------------------
    def check_in(self, agents: list[str] | None = None) -> None:
        for a in agents or self.agents:
            self._to_server(a, self.manager.check_in(a, CheckIn(a), self.now, version=0, run=None))
        self.pump()

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self._to_server("", self.manager.tick(self.now, version=0, run=None))
        self.pump()

    def run_to_end(self, *, limit: int = 10) -> None:
        """Tick past round timeouts until every cohort ended."""
        for _ in range(limit):
            if not self.manager.cohorts:
                return
            self.advance(self.settings.timeout + 0.01)
        raise AssertionError(f"cohorts still open: {self.manager.in_flight()}")

    def pump(self) -> None:
        while self._queue:
            direction, agent, payload = self._queue.popleft()
            if direction == "down":
                self._deliver_down(agent, payload)
            else:
                self._deliver_up(agent, payload)

    # --- plumbing ------------------------------------------------------------------------------
    def _to_server(self, _sender: str, outs: list[Any]) -> None:
        for o in outs:
            if isinstance(o, SendTo):
                self._queue.append(("down", o.agent, o.message.to_bytes()))
            elif isinstance(o, Reject):
                self.rejects.append(o)
            elif isinstance(o, (Unmasked, Abandoned)):
                self.results.append(o)
                if isinstance(o, Unmasked):  # the aggregator applies it, then tells the members
                    self._to_server("", done_messages(o.cohort, o.members, "applied", 1, None))

    def _deliver_down(self, agent: str, payload: bytes) -> None:
        if agent in self.dead:
            return
        msg = decode_down(payload)
        if self.down_filter is not None:
            filtered = self.down_filter(agent, msg)
            if filtered is None:
                return
            msg = filtered
        if isinstance(msg, CohortMsg):
            session = ClientSession(
                agent, msg, now=self.now, signer=self.signers.get(agent), verifier=self.verifier,
            )  # fmt: skip
            self.sessions[agent] = session
            self._from_client(agent, session.start())
        else:
            session = self.sessions[agent]
            self._from_client(agent, session.handle(msg))

    def _from_client(self, agent: str, outs: list[Any]) -> None:
        for o in outs:
            self.client_events[agent].append(o)
            if isinstance(o, Send):
                kind = o.message.kind
                if self.die_before.get(agent) == kind:
                    self.kill(agent)
                    return
                msg: UpMessage | None = o.message
                if self.up_filter is not None:
                    msg = self.up_filter(agent, o.message)
                if msg is not None:
                    self._queue.append(("up", agent, msg.to_bytes()))
            elif isinstance(o, NeedInput):
                if self.die_before.get(agent) == "sa_masked":
                    self.kill(agent)
                    return
                values = np.concatenate([self.inputs[agent] * self.weights[agent], [self.weights[agent]]])
                session = self.sessions[agent]
                self._from_client(agent, session.provide_input(values, seq=1, base_version=0))

    def _deliver_up(self, agent: str, payload: bytes) -> None:
        msg = decode_up(payload)
        self._to_server(agent, self.manager.receive(agent, msg, self.now))

    def kill(self, agent: str) -> None:
        self.dead.add(agent)
        if self.tell_offline:
            self._to_server(agent, self.manager.offline(agent, self.now))

    # --- reading -------------------------------------------------------------------------------
    def expected(self, contributors: list[str]) -> np.ndarray:
        """``[sum w x, sum w]`` over ``contributors``, what the aggregator should learn."""
        return np.sum(
            [np.concatenate([self.inputs[a] * self.weights[a], [self.weights[a]]]) for a in contributors], axis=0
        )

    def events(self, agent: str, kind: type) -> list[Any]:
        return [e for e in self.client_events[agent] if isinstance(e, kind)]

    def refusals(self) -> dict[str, str]:
        return {a: e.reason for a in self.agents for e in self.events(a, Refused)}

    def finished(self, agent: str) -> list[Finished]:
        return self.events(agent, Finished)

    def ignored(self, agent: str) -> list[Ignored]:
        return self.events(agent, Ignored)


@dataclass
class CoreFleet:
    """Client sessions wired to a whole :class:`~aggregator.core.AggregatorCore` (rule, receipts, log events)."""

    core: Any
    n: int
    seed: int = 0
    now: float = 1000.0

    def __post_init__(self) -> None:
        self.agents = [f"dev-{i:02d}" for i in range(self.n)]
        self.sessions: dict[str, ClientSession] = {}
        self.log: list[Any] = []
        """Every LogEvent the core asked for, in order (what the write-ahead log would hold)."""
        self.receipts: list[Any] = []
        self.rejected: list[Any] = []
        self.dead: set[str] = set()
        self.die_before: dict[str, str] = {}
        self.seq = 0
        self.updates: dict[str, int] = {}
        """Updates each device has trained and not yet masked."""
        self.fixed_seq: dict[str, int] = {}
        """agent -> the seq its next upload carries (a re-send of an old one); others count up."""
        self._queue: deque[tuple[str, bytes]] = deque()
        rng = CipherRng(self.seed)
        weights = self.core.weights
        self.deltas = {
            a: {k: rng.normal(0, 0.05, v.shape).astype(v.dtype) for k, v in weights.items()} for a in self.agents
        }

    def effects(self, effects: Any) -> None:
        from aggregator.core import LogEvent, SendReceipt, SendSecAgg

        for e in effects:
            if isinstance(e, LogEvent):
                self.log.append(e.event)
            elif isinstance(e, SendReceipt):
                self.receipts.append(e.receipt)
            elif isinstance(e, SendSecAgg):
                self._queue.append((e.agent, e.payload))

    def check_in(self, agents: list[str] | None = None) -> None:
        """Every device trains one update: a session waiting for one gets it, the others check in."""
        for a in agents or self.agents:
            self.updates[a] = self.updates.get(a, 0) + 1
            session = self.sessions.get(a)
            if session is not None and session.waiting_for_input and a not in self.dead:
                self._provide(a)
            elif session is None or session.expired(self.now) or session.uploaded:
                refused, effects = self.core.secagg_message(a, CheckIn(a), now=self.now)
                self.rejected += refused
                self.effects(effects)
        self.pump()

    def _provide(self, agent: str) -> None:
        from fedmq.secagg.client import weighted_input

        self.updates[agent] -= 1
        self.seq += 1
        seq = self.fixed_seq.pop(agent, self.seq)
        values = weighted_input(self.deltas[agent], clip_norm=1.0, weight=1.0)
        outs = self.sessions[agent].provide_input(values, seq=seq, base_version=self.core.version)
        self._send(agent, [x for x in outs if isinstance(x, Send)])

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.effects(self.core.tick(self.now))
        self.pump()

    def pump(self) -> None:
        while self._queue:
            agent, payload = self._queue.popleft()
            if agent in self.dead:
                continue
            msg = decode_down(payload)
            if isinstance(msg, CohortMsg):
                self.sessions[agent] = ClientSession(agent, msg, now=self.now)
                outs = self.sessions[agent].start()
            elif agent in self.sessions:
                outs = self.sessions[agent].handle(msg)
            else:
                continue
            for o in outs:
                if isinstance(o, NeedInput):
                    if self.die_before.get(agent) == "sa_masked":
                        self.dead.add(agent)
                        break
                    if self.updates.get(agent, 0) > 0:  # else it waits until it has trained one
                        self._provide(agent)
                elif isinstance(o, Send):
                    if self.die_before.get(agent) == o.message.kind:
                        self.dead.add(agent)
                        break
                    self._send(agent, [o])

    def _send(self, agent: str, sends: list[Send]) -> None:
        for o in sends:
            refused, effects = self.core.secagg_message(agent, decode_up(o.message.to_bytes()), now=self.now)
            self.rejected += refused
            self.effects(effects)
