"""Typed messages of the wire schema (version :data:`fedmq.SCHEMA_VERSION`).

Each message is a msgpack map with ``schema`` (int) and ``kind`` (str) first. The
``from_wire`` constructors validate every field of an untrusted map and raise
:class:`~fedmq.errors.DecodeError` with a reason; see ``docs/protocol.md``.

What devices send (updates, statuses) is decoded strictly: a field this schema does not name
is refused (``bad_field``), so a device cannot make the aggregator keep, log or checkpoint
bytes it never uses. What the aggregator sends (models, receipts, metrics) is read leniently
by agents, so that a newer aggregator can add fields without breaking older devices.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from fedmq import SCHEMA_VERSION
from fedmq.codec import DEFAULT_LIMITS, DecodeLimits, Tensors, decode_tensors, encode_tensors, pack, unpack
from fedmq.compression import METHODS, WireTensor, decode_delta, encode_wire
from fedmq.errors import DecodeError, RejectReason
from fedmq.secagg.messages import Params
from fedmq.topics import is_agent_id

RUN_ID_CHARS = frozenset("0123456789abcdef")

Mode = Literal["async", "sync"]
AgentState = Literal["online", "offline", "training", "budget_exhausted", "stopped"]
_AGENT_STATES = ("online", "offline", "training", "budget_exhausted", "stopped")


def _check_fields(obj: dict[str, Any], allowed: frozenset[str], kind: str) -> None:
    unknown = obj.keys() - allowed
    if unknown:
        names = ", ".join(repr(k[:32]) for k in sorted(unknown)[:4])
        raise DecodeError(RejectReason.BAD_FIELD, f"unknown field(s) {names} in a {kind} (schema {SCHEMA_VERSION})")


def _run_id(obj: dict[str, Any], key: str) -> str | None:
    v = obj.get(key)
    if v is None:
        return None
    if not (isinstance(v, str) and 8 <= len(v) <= 64 and set(v) <= RUN_ID_CHARS):
        raise DecodeError(RejectReason.BAD_FIELD, f"{key} must be 8-64 lowercase hex digits or nil")
    return v


def _check_header(obj: dict[str, Any], kind: str) -> None:
    schema = obj.get("schema")
    if schema != SCHEMA_VERSION:
        raise DecodeError(RejectReason.SCHEMA_VERSION, f"schema {schema!r}, this build speaks {SCHEMA_VERSION}")
    if obj.get("kind") != kind:
        raise DecodeError(RejectReason.WRONG_KIND, f"kind {obj.get('kind')!r}, expected {kind!r}")


def _int(obj: dict[str, Any], key: str, *, minimum: int = 0) -> int:
    v = obj.get(key)
    if type(v) is not int or v < minimum:
        raise DecodeError(RejectReason.BAD_FIELD, f"{key} must be an int >= {minimum}, got {v!r}"[:200])
    return v


def _float(obj: dict[str, Any], key: str, *, optional: bool = False) -> float | None:
    v: Any = obj.get(key)
    if v is None and optional:
        return None
    if type(v) not in (int, float) or not math.isfinite(v):
        raise DecodeError(RejectReason.BAD_FIELD, f"{key} must be a finite number, got {v!r}"[:200])
    return float(v)


def _str(obj: dict[str, Any], key: str) -> str:
    v = obj.get(key)
    if not isinstance(v, str):
        raise DecodeError(RejectReason.BAD_FIELD, f"{key} must be a string")
    return v


def _agent_id(obj: dict[str, Any], *, server_ok: bool = False) -> str:
    v = obj.get("agent_id")
    if not (is_agent_id(v) or (server_ok and v == "server")):
        raise DecodeError(RejectReason.BAD_FIELD, "agent_id must be 1-64 characters of [A-Za-z0-9_.-]")
    assert isinstance(v, str)
    return v


MAX_LABELS = 1024
MAX_LABEL_CHARS = 64
MAX_DETAIL_CHARS = 200


def salvage_seq(payload: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> int | None:
    """The ``seq`` of an update that failed to decode, if it can be read at all, else ``None``.

    Used only to address the ``rejected`` receipt of an undecodable update: nothing else of the
    payload is trusted or used.
    """
    try:
        obj = unpack(payload, limits)
    except DecodeError:
        return None
    seq = obj.get("seq") if isinstance(obj, dict) else None
    return seq if type(seq) is int and 0 <= seq < 2**63 else None


@dataclass(frozen=True)
class ModelSpec:
    """What an agent needs to build the model locally: registry name and dimensions.

    ``labels`` names the classes (empty: unnamed), so that a device can print "stop" rather than 8.
    ``input_range`` is the ``(low, high)`` the model's inputs are scaled to. An agent whose data
    lies far outside it warns that it has not normalised its data as the model expects.
    """

    name: str
    num_features: int
    num_classes: int
    hidden: int = 64
    labels: tuple[str, ...] = ()
    input_range: tuple[float, float] | None = None

    def to_wire(self) -> dict[str, Any]:
        """Plain map for the ``model`` field."""
        out: dict[str, Any] = {
            "name": self.name,
            "num_features": self.num_features,
            "num_classes": self.num_classes,
            "hidden": self.hidden,
        }
        if self.labels:
            out["labels"] = list(self.labels)
        if self.input_range is not None:
            out["input_range"] = list(self.input_range)
        return out

    @classmethod
    def from_wire(cls, obj: Any) -> ModelSpec:
        """Validate an untrusted ``model`` field."""
        if not isinstance(obj, dict):
            raise DecodeError(RejectReason.BAD_FIELD, "model must be a map")
        num_classes = _int(obj, "num_classes", minimum=2)
        labels = obj.get("labels") or []
        if not (
            isinstance(labels, list)
            and len(labels) <= min(num_classes, MAX_LABELS)
            and all(isinstance(x, str) and 0 < len(x) <= MAX_LABEL_CHARS for x in labels)
        ):
            raise DecodeError(
                RejectReason.BAD_FIELD, f"model.labels must be at most num_classes strings of 1-{MAX_LABEL_CHARS} chars"
            )
        rng = obj.get("input_range")
        input_range: tuple[float, float] | None = None
        if rng is not None:
            if not (
                isinstance(rng, list)
                and len(rng) == 2
                and all(type(v) in (int, float) and math.isfinite(v) for v in rng)
                and rng[0] < rng[1]
            ):
                raise DecodeError(RejectReason.BAD_FIELD, "model.input_range must be [low, high] with low < high")
            input_range = (float(rng[0]), float(rng[1]))
        return cls(
            _str(obj, "name"),
            _int(obj, "num_features", minimum=1),
            num_classes,
            _int(obj, "hidden", minimum=1),
            tuple(labels),
            input_range,
        )


PLAN_FIELDS: dict[str, type] = {
    "local_epochs": int,
    "lr": float,
    "batch_size": int,
    "clip_norm": float,
    "noise_multiplier": float,
    "compression": str,
    "topk_fraction": float,
}
"""What a federation plan may set, and each field's type."""
PLAN_KEEPABLE = frozenset({"local_epochs", "batch_size"})
"""Plan fields a device may keep its own value for (``agent.keep_local``): its compute and memory.
The rest define the federation: the learning rate, and the clip and noise the aggregator checks."""


def plan_problem(key: str, value: Any) -> str | None:
    """Why ``value`` cannot be the plan's ``key`` (``None``: it can): one rule for the decoder and the config."""
    kind = PLAN_FIELDS[key]
    if kind is int:
        ok, want = type(value) is int and 1 <= value <= 100_000, "an int in 1-100000"
    elif kind is float:
        low_ok = value >= 0 if key == "noise_multiplier" else value > 0
        high = 1.0 if key == "topk_fraction" else 1e6
        ok = type(value) in (int, float) and math.isfinite(value) and low_ok and value <= high
        want = f"a number in {'[0' if key == 'noise_multiplier' else '(0'}, {high:g}]"
    else:
        ok, want = value in METHODS, f"one of {', '.join(METHODS)}"
    return None if ok else f"must be {want}, got {value!r}"


@dataclass(frozen=True)
class Plan:
    """The federation plan: how every device trains and protects its update, set by the aggregator.

    Published with each model (retained), so that a fleet is configured in one place, as
    Flower's server-side fit config is. ``None`` fields are not planned: a device's own setting
    applies. The model's name and shape are in :class:`ModelSpec`.
    """

    local_epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    clip_norm: float | None = None
    noise_multiplier: float | None = None
    """Local DP noise z (0: none). With a clip it is what the aggregator's ``not_private`` check expects."""
    compression: str | None = None
    topk_fraction: float | None = None

    def items(self) -> dict[str, Any]:
        """The planned (non-``None``) fields."""
        return {k: getattr(self, k) for k in PLAN_FIELDS if getattr(self, k) is not None}

    def to_wire(self) -> dict[str, Any]:
        """Plain map for the ``plan`` field."""
        return self.items()

    @classmethod
    def from_wire(cls, obj: Any) -> Plan:
        """Validate an untrusted ``plan`` field: known keys, types and ranges only."""
        if not isinstance(obj, dict):
            raise DecodeError(RejectReason.BAD_FIELD, "plan must be a map")
        _check_fields(obj, frozenset(PLAN_FIELDS), "plan")
        out: dict[str, Any] = {}
        for key, value in obj.items():
            if value is None:
                continue
            problem = plan_problem(key, value)
            if problem is not None:
                raise DecodeError(RejectReason.BAD_FIELD, f"plan.{key} {problem}"[:200])
            out[key] = float(value) if PLAN_FIELDS[key] is float else value
        return cls(**out)


@dataclass(frozen=True)
class ModelMessage:
    """A global model version, published retained on ``{prefix}/model``.

    ``selected`` is ``None`` in async mode (every agent may train); in sync mode it lists the
    agent ids the round waits for, and only they train on this version.

    ``run`` names the federation run the versions belong to: it changes when the aggregator
    starts afresh or an operator confirms a rollback (``fedmq recover --accept-loss``), and an
    agent that sees a new run follows it, even to a lower version.
    """

    version: int
    model: ModelSpec
    tensors: Tensors
    mode: Mode = "async"
    selected: tuple[str, ...] | None = None
    max_staleness: int = 20
    created_at: float = 0.0
    run: str | None = None
    secagg: Params | None = None
    """Set when the aggregator takes only masked updates (secure aggregation): how to quantize and weight."""
    plan: Plan | None = None
    """How devices train and protect their updates (``None``: every device uses its own settings)."""
    kind: str = field(default="model", init=False)

    def to_bytes(self) -> bytes:
        """Serialize for publishing."""
        return pack(
            {
                "schema": SCHEMA_VERSION,
                "kind": "model",
                "version": self.version,
                "model": self.model.to_wire(),
                "mode": self.mode,
                "selected": list(self.selected) if self.selected is not None else None,
                "max_staleness": self.max_staleness,
                "created_at": self.created_at,
                "run": self.run,
                "secagg": self.secagg.to_wire() if self.secagg is not None else None,
                "plan": self.plan.to_wire() if self.plan is not None else None,
                "tensors": encode_tensors(self.tensors),
            }
        )

    @classmethod
    def from_bytes(cls, payload: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> ModelMessage:
        """Decode and validate an untrusted model message."""
        obj = unpack(payload, limits)
        _check_header(obj, "model")
        mode = obj.get("mode")
        if mode not in ("async", "sync"):
            raise DecodeError(RejectReason.BAD_FIELD, f"mode must be 'async' or 'sync', got {mode!r}"[:200])
        selected = obj.get("selected")
        if selected is not None and not (isinstance(selected, list) and all(isinstance(s, str) for s in selected)):
            raise DecodeError(RejectReason.BAD_FIELD, "selected must be null or a list of agent ids")
        return cls(
            version=_int(obj, "version"),
            model=ModelSpec.from_wire(obj.get("model")),
            tensors=decode_tensors(obj.get("tensors"), where="tensors", limits=limits),
            mode=mode,
            selected=tuple(selected) if selected is not None else None,
            max_staleness=_int(obj, "max_staleness"),
            created_at=_float(obj, "created_at") or 0.0,
            run=_run_id(obj, "run"),
            secagg=Params.from_wire(obj["secagg"]) if obj.get("secagg") is not None else None,
            plan=Plan.from_wire(obj["plan"]) if obj.get("plan") is not None else None,
        )


@dataclass(frozen=True)
class UpdateMessage:
    """One agent's update: ``delta = w_local - w_base`` after clipping and noise.

    ``(agent_id, seq)`` identifies an update; ``seq`` increases by one per release.
    ``epsilon`` is the agent's cumulative privacy loss after this release (``None`` when
    the agent runs without differential privacy). ``num_examples`` is what the agent claims
    (agents report a power of two, see :func:`report_examples`); ``train_loss`` is only sent
    when the agent is configured to (``agent.send_train_loss``). ``base_run`` is the run of the
    model it was trained on (:attr:`ModelMessage.run`).
    """

    agent_id: str
    seq: int
    base_version: int
    num_examples: int
    delta: Tensors
    train_loss: float | None = None
    epsilon: float | None = None
    sent_at: float = 0.0
    oldest_pending: int | None = None
    """The lowest ``seq`` still in the agent's outbox when this update was made: every update
    below it has its receipt, so the aggregator may forget them (it never sees them again)."""
    base_run: str | None = None
    weight: float | None = None
    """A site's sum only (hierarchical aggregation, docs/scale-out.md): the FedBuff weight
    ``sum_i n_i s(tau_i)`` of the device updates in it, their staleness taken against
    ``base_version``; ``delta`` is then their weighted mean. The root weighs it ``weight *
    s(version - base_version)`` and takes it only from the ids in ``aggregator.sites``."""
    contributions: int | None = None
    """A site's sum only: how many device updates it holds (they count towards FedBuff's K).
    Set together with ``weight``."""
    wire: Mapping[str, WireTensor] | None = field(default=None, compare=False, repr=False)
    """The delta as sent, when compressed (:mod:`fedmq.compression`); ``delta`` is then the
    dense tensors the aggregator reconstructs. ``None``: ``delta`` is sent as it is."""
    kind: str = field(default="update", init=False)

    def to_bytes(self) -> bytes:
        """Serialize for publishing."""
        obj: dict[str, Any] = {
            "schema": SCHEMA_VERSION,
            "kind": "update",
            "agent_id": self.agent_id,
            "seq": self.seq,
            "base_version": self.base_version,
            "num_examples": self.num_examples,
            "epsilon": self.epsilon,
            "sent_at": self.sent_at,
            "delta": (
                {str(k): encode_wire(v) for k, v in self.wire.items()}
                if self.wire is not None
                else encode_tensors(self.delta)
            ),
        }
        for key in ("train_loss", "oldest_pending", "base_run", "weight", "contributions"):  # absent, not nil
            if getattr(self, key) is not None:
                obj[key] = getattr(self, key)
        return pack(obj)

    @classmethod
    def from_bytes(cls, payload: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> UpdateMessage:
        """Decode and validate an untrusted update."""
        obj = unpack(payload, limits)
        _check_header(obj, "update")
        _check_fields(obj, UPDATE_FIELDS, "update")
        weight, contributions = _site_sum(obj)
        return cls(
            agent_id=_agent_id(obj),
            seq=_int(obj, "seq"),
            base_version=_int(obj, "base_version"),
            num_examples=_int(obj, "num_examples", minimum=1),
            delta=decode_delta(obj.get("delta"), where="delta", limits=limits),
            train_loss=_float(obj, "train_loss", optional=True),
            epsilon=_float(obj, "epsilon", optional=True),
            sent_at=_float(obj, "sent_at") or 0.0,
            oldest_pending=_int(obj, "oldest_pending") if obj.get("oldest_pending") is not None else None,
            base_run=_run_id(obj, "base_run"),
            weight=weight,
            contributions=contributions,
        )

    @property
    def is_sum(self) -> bool:
        """A site's sum of device updates (:attr:`weight` and :attr:`contributions` set)."""
        return self.contributions is not None


MAX_CONTRIBUTIONS = 1_000_000
"""The most device updates one site's sum may claim."""


def _site_sum(obj: dict[str, Any]) -> tuple[float | None, int | None]:
    """``weight`` and ``contributions``: both absent, or both valid."""
    if obj.get("weight") is None and obj.get("contributions") is None:
        return None, None
    weight = _float(obj, "weight")
    contributions = _int(obj, "contributions", minimum=1)
    assert weight is not None
    if not weight > 0:
        raise DecodeError(RejectReason.BAD_FIELD, f"weight must be > 0, got {weight!r}")
    if contributions > MAX_CONTRIBUTIONS:
        raise DecodeError(RejectReason.BAD_FIELD, f"contributions must be <= {MAX_CONTRIBUTIONS}")
    return weight, contributions


UPDATE_FIELDS = frozenset(
    {
        "schema", "kind", "agent_id", "seq", "base_version", "num_examples", "train_loss",
        "epsilon", "sent_at", "delta", "oldest_pending", "base_run", "weight", "contributions",
    }
)  # fmt: skip
"""Every field an update may carry; anything else is refused (``bad_field``)."""


def report_examples(n: int, *, exact: bool = False) -> int:
    """What an agent claims as its example count: ``n`` rounded down to a power of two.

    The exact size of a device's data set is itself private (how many patients a clinic saw
    this week); a power of two keeps FedAvg/FedBuff weights within a factor of 2 of the truth.
    """
    if n < 1:
        raise ValueError(f"need n >= 1, got {n}")
    return n if exact else 1 << (n.bit_length() - 1)


ReceiptStatus = Literal["accepted", "rejected", "retry"]


@dataclass(frozen=True)
class ReceiptMessage:
    """The aggregator's answer to one update, sent after an accepted one is durable.

    ``accepted``: the update is in the write-ahead log and will survive a crash; ``version``
    is the model version right after it was taken. ``rejected``: ``reason`` says why; the
    agent must not re-send it. ``retry``: not now (``reason`` ``rate_limited`` or
    ``agent_buffered``); the agent keeps it and sends it again after ``retry_after`` seconds,
    and trains nothing new meanwhile. A re-sent update that was accepted before gets the same
    receipt again.
    """

    agent_id: str
    seq: int
    status: ReceiptStatus
    version: int
    reason: str | None = None
    index: int | None = None
    """Accepted: the update's position in the aggregator's order of application (from 1)."""
    retry_after: float | None = None
    """Retry: seconds to wait before sending it again."""
    deferred: bool | None = None
    """Accepted and held for the next FedBuff buffer (its agent had one in the open buffer): it is
    applied when that buffer steps. ``None`` otherwise."""
    detail: str | None = None
    """Rejected or retry: what was wrong, in words (at most 200 characters), for the device's log."""

    def to_bytes(self) -> bytes:
        """Encode."""
        return pack(
            {
                "schema": SCHEMA_VERSION,
                "kind": "receipt",
                "detail": self.detail[:MAX_DETAIL_CHARS] if self.detail is not None else None,
                "agent_id": self.agent_id,
                "seq": self.seq,
                "status": self.status,
                "version": self.version,
                "reason": self.reason,
                "index": self.index,
                "retry_after": self.retry_after,
                "deferred": self.deferred,
            }
        )

    @classmethod
    def from_bytes(cls, payload: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> ReceiptMessage:
        """Decode and validate a receipt."""
        obj = unpack(payload, limits)
        _check_header(obj, "receipt")
        status = obj.get("status")
        if status not in ("accepted", "rejected", "retry"):
            raise DecodeError(RejectReason.BAD_FIELD, "status must be accepted, rejected or retry")
        reason = obj.get("reason")
        if reason is not None and not isinstance(reason, str):
            raise DecodeError(RejectReason.BAD_FIELD, "reason must be a string or nil")
        index = obj.get("index")
        if index is not None and (type(index) is not int or index < 1):
            raise DecodeError(RejectReason.BAD_FIELD, "index must be an int >= 1 or nil")
        detail = obj.get("detail")
        if detail is not None and not (isinstance(detail, str) and len(detail) <= MAX_DETAIL_CHARS):
            raise DecodeError(RejectReason.BAD_FIELD, f"detail must be a string of at most {MAX_DETAIL_CHARS} chars")
        return cls(
            agent_id=_agent_id(obj),
            seq=_int(obj, "seq"),
            status=status,
            version=_int(obj, "version"),
            reason=reason,
            index=index,
            retry_after=_retry_after(obj),
            deferred=True if obj.get("deferred") is True else None,
            detail=detail,
        )


def _retry_after(obj: dict[str, Any]) -> float | None:
    v = _float(obj, "retry_after", optional=True)
    if v is not None and not 0 <= v <= 86_400:
        raise DecodeError(RejectReason.BAD_FIELD, "retry_after must be 0-86400 seconds or nil")
    return v


@dataclass(frozen=True)
class StatusMessage:
    """Liveness of an agent or of the aggregator (retained; the MQTT Will publishes ``offline``)."""

    agent_id: str
    state: AgentState
    epsilon: float | None = None
    seq: int = 0
    ts: float = 0.0
    budget: float | None = None
    """The device's epsilon budget (``--epsilon-budget``), for dashboards; ``None``: none set."""
    kind: str = field(default="status", init=False)

    def to_bytes(self) -> bytes:
        """Serialize for publishing."""
        return pack(
            {
                "schema": SCHEMA_VERSION,
                "kind": "status",
                "agent_id": self.agent_id,
                "state": self.state,
                "epsilon": self.epsilon,
                "seq": self.seq,
                "ts": self.ts,
                **({"budget": self.budget} if self.budget is not None else {}),
            }
        )

    @classmethod
    def from_bytes(cls, payload: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> StatusMessage:
        """Decode and validate an untrusted status message."""
        obj = unpack(payload, limits)
        _check_header(obj, "status")
        _check_fields(obj, STATUS_FIELDS, "status")
        state = obj.get("state")
        if state not in _AGENT_STATES:
            raise DecodeError(RejectReason.BAD_FIELD, f"state must be one of {_AGENT_STATES}")
        return cls(
            agent_id=_agent_id(obj, server_ok=True),
            state=state,
            epsilon=_float(obj, "epsilon", optional=True),
            seq=_int(obj, "seq"),
            ts=_float(obj, "ts") or 0.0,
            budget=_float(obj, "budget", optional=True),
        )


STATUS_FIELDS = frozenset({"schema", "kind", "agent_id", "state", "epsilon", "seq", "ts", "budget"})
"""Every field a status may carry; anything else is refused (``bad_field``)."""


def metrics_to_bytes(metrics: dict[str, Any]) -> bytes:
    """Serialize an aggregator metrics map (``docs/protocol.md`` lists its keys)."""
    return pack({"schema": SCHEMA_VERSION, "kind": "metrics", **metrics})


def metrics_from_bytes(payload: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> dict[str, Any]:
    """Decode a metrics map (for dashboards and tests)."""
    obj = unpack(payload, limits)
    _check_header(obj, "metrics")
    return obj
