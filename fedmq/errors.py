"""Error types that carry data and say whose fault an error is.

* :class:`ConfigError` is *ours* (the operator's): it names the configuration key and is
  raised at startup, before any connection is made.
* :class:`PeerError` and its subclasses are a *peer's* fault (a device sent something we
  will not use): they carry a :class:`RejectReason` that is counted and published, and the
  service keeps running.
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


class PeerError(FedmqError):
    """A message from a peer was rejected; the fault is the peer's, not ours."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


class DecodeError(PeerError):
    """The bytes could not be decoded into a valid message under the schema and limits."""
