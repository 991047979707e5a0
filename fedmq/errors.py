"""Error types that carry data and say whose fault an error is.

* :class:`ConfigError` is *ours* (the operator's): it names the configuration key and is
  raised at startup, before any connection is made.
* :class:`PeerError` and its subclasses are a *peer's* fault (a device sent something we
  will not use): they carry a :class:`RejectReason` that is counted and published, and the
  service keeps running.
* :class:`StateError` is damage to, or inconsistency of, what a service keeps on disk
  (a checkpoint or log that fails its checksum, a file that went missing): it names the file
  (and the offset) and stops the start, so that nothing is repaired silently.
"""

from __future__ import annotations

import enum


class FedmqError(Exception):
    """Base class of every error fedmq raises on purpose."""


class ConfigError(FedmqError):
    """A configuration value is missing or invalid; ``key`` names it (dotted path)."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"config key '{key}': {problem}")
        self.key = key
        self.problem = problem


class MissingExtra(ConfigError):
    """A feature needs an optional extra that is not installed; the message says what to install.

    ``pip install fedmq`` is the device install (the agent, the accountant, TLS). The rest comes
    in extras: ``server`` (the aggregator's metrics endpoint and bundled evaluation data),
    ``demo`` (the one-command demo, simulations, plots), ``torch`` and ``onnx``.
    """

    def __init__(self, key: str, extra: str, why: str, missing: str) -> None:
        super().__init__(
            key, f"{why} needs the '{extra}' extra ({missing} is not installed): pip install 'fedmq[{extra}]'"
        )
        self.extra = extra
        self.missing = missing


class RejectReason(enum.StrEnum):
    """Why a peer's message was not used. The values are stable: they appear in metrics."""

    TOO_LARGE = "too_large"
    MALFORMED = "malformed"
    SCHEMA_VERSION = "schema_version"
    WRONG_KIND = "wrong_kind"
    BAD_FIELD = "bad_field"
    BAD_DTYPE = "bad_dtype"
    SHAPE_MISMATCH = "shape_mismatch"
    NON_FINITE = "non_finite"
    AGENT_ID_MISMATCH = "agent_id_mismatch"
    UNKNOWN_BASE_VERSION = "unknown_base_version"
    TOO_STALE = "too_stale"
    NOT_SELECTED = "not_selected"
    DUPLICATE = "duplicate"
    MODEL_MISMATCH = "model_mismatch"
    NOT_PRIVATE = "not_private"
    OUT_OF_RANGE = "out_of_range"
    """Finite, but so large that aggregation would overflow (L2 norm above ``aggregator.max_update_norm``)."""
    RULE_REFUSED = "rule_refused"
    """The aggregation rule raised a ValueError about this update (its buffer stays as it was)."""
    RATE_LIMITED = "rate_limited"
    """The agent's token bucket is empty; a ``retry`` receipt says when to send it again."""
    AGENT_BUFFERED = "agent_buffered"
    """The agent already has an update in the open FedBuff buffer; ``retry`` after it flushes."""
    BAD_TOPIC = "bad_topic"
    """An update on a topic whose last level is not a valid agent id (counted, never decoded)."""
    WRONG_RUN = "wrong_run"
    """Trained on a model of another federation run (the aggregator started afresh or rolled back)."""
    SECURE_AGGREGATION_REQUIRED = "secure_aggregation_required"
    """A plain update sent to an aggregator that only takes masked ones (it is not looked at)."""
    WRONG_COHORT = "wrong_cohort"
    """A secure-aggregation message for a cohort that is not open, or not the sender's."""
    NOT_MEMBER = "not_member"
    """A secure-aggregation message from a device that is not in the cohort it names."""
    WRONG_PHASE = "wrong_phase"
    """A secure-aggregation message for a round of the protocol that is over or not yet open."""
    NOT_NEIGHBOUR = "not_neighbour"
    """Shares addressed to, or revealed for, a device that is not the sender's neighbour."""
    BAD_SHARE = "bad_share"
    """A share that is malformed, or that does not lie on the sender's polynomial."""
    BAD_SIGNATURE = "bad_signature"
    """Public keys whose signature does not verify against the federation CA."""
    REPLAYED = "replayed"
    """A masked upload whose bytes were already uploaded in another cohort."""
    SECOND_UPLOAD = "second_upload"
    """A second, different masked upload from one device in one cohort."""
    LATE_UPLOAD = "late_upload"
    """A masked upload after its cohort had its K: flow control, the update goes to the next cohort."""
    NOT_A_SITE = "not_a_site"
    """A sum of device updates (a site's) from a sender that ``aggregator.sites`` does not list."""
    PARTICIPATION_WINDOW = "participation_window"
    """The device was in a released sum fewer than ``aggregator.min_separation`` versions ago: ``retry`` later."""
    PARTICIPATION_CAP = "participation_cap"
    """The device's updates are already in ``aggregator.max_participation`` released sums (its privacy is spent)."""


class PeerError(FedmqError):
    """A message from a peer was rejected; the fault is the peer's, not ours."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


class DecodeError(PeerError):
    """The bytes could not be decoded into a valid message under the schema and limits."""


RETRYABLE = frozenset(
    {
        RejectReason.RATE_LIMITED,
        RejectReason.AGENT_BUFFERED,
        RejectReason.LATE_UPLOAD,
        RejectReason.PARTICIPATION_WINDOW,
    }
)
"""Refusals that are not final: the receipt's status is ``retry`` and the agent keeps the update."""


class StateError(FedmqError):
    """A state file is damaged, missing or inconsistent; ``path`` names it (``offset`` where known).

    Raised at startup instead of repairing anything: ``fedmq recover`` decides what to keep.
    """

    def __init__(self, path: str, problem: str, *, offset: int | None = None, hint: str | None = None) -> None:
        where = f"{path} at offset {offset}" if offset is not None else path
        super().__init__(f"{where}: {problem}" + (f"; {hint}" if hint else ""))
        self.path = path
        self.problem = problem
        self.offset = offset
        self.hint = hint
