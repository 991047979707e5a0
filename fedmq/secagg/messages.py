"""Wire messages of the secure-aggregation protocol (``docs/protocol.md``, "Secure aggregation").

Every message is a msgpack map with ``schema``, ``kind`` and ``cohort`` (32 lowercase hex
digits), decoded with the same size limits and strictness as the rest of the schema: a field
this schema does not name is refused (``bad_field``) in what devices send, and every field is
type- and size-checked before use. Devices publish on ``{prefix}/secagg/up/{agent_id}``; the
aggregator answers each device on ``{prefix}/secagg/down/{agent_id}``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from fedmq import SCHEMA_VERSION
from fedmq.codec import DEFAULT_LIMITS, DecodeLimits, pack, unpack
from fedmq.errors import DecodeError, RejectReason
from fedmq.secagg.ddp import DdgParams, cohort_params
from fedmq.secagg.shamir import SHARE_BYTES
from fedmq.topics import is_agent_id

COHORT_CHARS = frozenset("0123456789abcdef")
MAX_COHORT = 4096
"""Most devices one cohort may name."""


def _bad(detail: str) -> DecodeError:
    return DecodeError(RejectReason.BAD_FIELD, detail[:200])


def _header(obj: dict[str, Any], kind: str, allowed: frozenset[str] | None) -> str:
    if obj.get("schema") != SCHEMA_VERSION:
        raise DecodeError(
            RejectReason.SCHEMA_VERSION, f"schema {obj.get('schema')!r}, this build speaks {SCHEMA_VERSION}"
        )
    if obj.get("kind") != kind:
        raise DecodeError(RejectReason.WRONG_KIND, f"kind {obj.get('kind')!r}, expected {kind!r}")
    if allowed is not None and (unknown := obj.keys() - allowed):
        raise _bad(f"unknown field(s) {sorted(k[:32] for k in unknown)[:4]} in a {kind}")
    cohort = obj.get("cohort")
    if not (isinstance(cohort, str) and len(cohort) == 32 and set(cohort) <= COHORT_CHARS):
        raise _bad("cohort must be 32 lowercase hex digits")
    return cohort


def _agent(obj: Mapping[str, Any], key: str = "agent_id") -> str:
    v = obj.get(key)
    if not is_agent_id(v):
        raise _bad(f"{key} must be an agent id")
    assert isinstance(v, str)
    return v


def _agents(obj: Mapping[str, Any], key: str) -> tuple[str, ...]:
    v = obj.get(key)
    if not (isinstance(v, list) and len(v) <= MAX_COHORT and all(is_agent_id(a) for a in v)):
        raise _bad(f"{key} must be a list of at most {MAX_COHORT} agent ids")
    if len(set(v)) != len(v):
        raise _bad(f"{key} names a device twice")
    return tuple(v)


def _bin(
    obj: Mapping[str, Any], key: str, *, size: int | None = None, optional: bool = False, limit: int = 8192
) -> bytes | None:
    v = obj.get(key)
    if v is None and optional:
        return None
    if not isinstance(v, (bytes, memoryview)):
        raise _bad(f"{key} must be bytes")
    n = len(v)
    if (size is not None and n != size) or n > limit:
        raise _bad(f"{key} must be {size if size is not None else f'at most {limit}'} bytes, got {n}")
    return bytes(v)


def _int(obj: Mapping[str, Any], key: str, lo: int = 0, hi: int = 1 << 62) -> int:
    v = obj.get(key)
    if type(v) is not int or not lo <= v <= hi:
        raise _bad(f"{key} must be an int in [{lo}, {hi}]")
    return v


def _float(obj: Mapping[str, Any], key: str, *, optional: bool = False) -> float | None:
    v: Any = obj.get(key)
    if v is None and optional:
        return None
    if type(v) not in (int, float) or not math.isfinite(v):
        raise _bad(f"{key} must be a finite number")
    return float(v)


def _bin_map(obj: Mapping[str, Any], key: str, *, size: int | None, limit: int = 4096) -> dict[str, bytes]:
    v = obj.get(key)
    if not isinstance(v, dict) or len(v) > MAX_COHORT:
        raise _bad(f"{key} must be a map of at most {MAX_COHORT} entries")
    out: dict[str, bytes] = {}
    for a in v:
        if not is_agent_id(a):
            raise _bad(f"{key} has a key that is no agent id")
        out[a] = _bin(v, a, size=size, limit=limit)  # type: ignore[assignment]
    return out


class _Message:
    kind: ClassVar[str]
    cohort: str

    def _wire(self) -> dict[str, Any]:
        raise NotImplementedError

    def to_bytes(self) -> bytes:
        """Encode."""
        return pack({"schema": SCHEMA_VERSION, "kind": self.kind, "cohort": self.cohort, **self._wire()})


# --- device -> aggregator -----------------------------------------------------------------------
@dataclass(frozen=True)
class CheckIn(_Message):
    """A device is ready for a cohort (sent while it is in none, repeated every few seconds)."""

    agent_id: str
    run: str | None = None
    cohort: str = "0" * 32
    kind: ClassVar[str] = "sa_checkin"
    FIELDS: ClassVar[frozenset[str]] = frozenset({"schema", "kind", "cohort", "agent_id", "run"})

    def _wire(self) -> dict[str, Any]:
        return {"agent_id": self.agent_id, "run": self.run}

    @classmethod
    def from_obj(cls, obj: dict[str, Any]) -> CheckIn:
        """Validate."""
        _header(obj, cls.kind, cls.FIELDS)
        run = obj.get("run")
        if run is not None and not (isinstance(run, str) and 8 <= len(run) <= 64):
            raise _bad("run must be a run id or nil")
        return cls(_agent(obj), run)


@dataclass(frozen=True)
class KeysMsg(_Message):
    """Round 0 (advertise keys): the device's two X25519 public keys, signed with its TLS key."""

    cohort: str
    agent_id: str
    mask_pk: bytes
    share_pk: bytes
    cert: bytes | None = None
    sig: bytes | None = None
    kind: ClassVar[str] = "sa_keys"
    FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"schema", "kind", "cohort", "agent_id", "mask_pk", "share_pk", "cert", "sig"}
    )

    def _wire(self) -> dict[str, Any]:
        return {
            "agent_id": self.agent_id,
            "mask_pk": self.mask_pk,
            "share_pk": self.share_pk,
            "cert": self.cert,
            "sig": self.sig,
        }

    @classmethod
    def from_obj(cls, obj: Mapping[str, Any], *, strict: bool = True) -> KeysMsg:
        """Validate (also an entry of a roster, ``strict=False``)."""
        cohort = _header(dict(obj), cls.kind, cls.FIELDS) if strict else ""
        return cls(
            cohort,
            _agent(obj),
            _bin(obj, "mask_pk", size=32),  # type: ignore[arg-type]
            _bin(obj, "share_pk", size=32),  # type: ignore[arg-type]
            _bin(obj, "cert", optional=True, limit=8192),
            _bin(obj, "sig", optional=True, limit=256),
        )


@dataclass(frozen=True)
class SharesMsg(_Message):
    """Round 1 (share keys): for each neighbour, its encrypted shares of this device's two secrets."""

    cohort: str
    agent_id: str
    commit: bytes
    """SHA-256 commitment to the self-mask seed (:func:`~fedmq.secagg.crypto.seed_commitment`)."""
    shares: dict[str, bytes]
    kind: ClassVar[str] = "sa_shares"
    FIELDS: ClassVar[frozenset[str]] = frozenset({"schema", "kind", "cohort", "agent_id", "commit", "shares"})

    def _wire(self) -> dict[str, Any]:
        return {"agent_id": self.agent_id, "commit": self.commit, "shares": self.shares}

    @classmethod
    def from_obj(cls, obj: dict[str, Any]) -> SharesMsg:
        """Validate."""
        cohort = _header(obj, cls.kind, cls.FIELDS)
        return cls(cohort, _agent(obj), _bin(obj, "commit", size=32), _bin_map(obj, "shares", size=None, limit=512))  # type: ignore[arg-type]


@dataclass(frozen=True)
class MaskedMsg(_Message):
    """Round 2 (masked input): the device's weighted, quantized, masked update."""

    cohort: str
    agent_id: str
    seq: int
    base_version: int
    data: bytes
    """Little-endian unsigned integers (4 bytes each up to 32 bits, else 8): the masked vector."""
    epsilon: float | None = None
    kind: ClassVar[str] = "sa_masked"
    FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"schema", "kind", "cohort", "agent_id", "seq", "base_version", "data", "epsilon"}
    )

    def _wire(self) -> dict[str, Any]:
        return {
            "agent_id": self.agent_id,
            "seq": self.seq,
            "base_version": self.base_version,
            "data": self.data,
            "epsilon": self.epsilon,
        }

    @classmethod
    def from_obj(cls, obj: dict[str, Any]) -> MaskedMsg:
        """Validate (the length against the model is the server's check)."""
        cohort = _header(obj, cls.kind, cls.FIELDS)
        return cls(
            cohort,
            _agent(obj),
            _int(obj, "seq"),
            _int(obj, "base_version"),
            _bin(obj, "data", limit=1 << 31),  # type: ignore[arg-type]
            _float(obj, "epsilon", optional=True),
        )


@dataclass(frozen=True)
class RevealMsg(_Message):
    """Round 3 (unmasking): shares of the self-mask seeds of survivors, of the mask keys of dropouts."""

    cohort: str
    agent_id: str
    seeds: dict[str, bytes]
    keys: dict[str, bytes]
    kind: ClassVar[str] = "sa_reveal"
    FIELDS: ClassVar[frozenset[str]] = frozenset({"schema", "kind", "cohort", "agent_id", "seeds", "keys"})

    def _wire(self) -> dict[str, Any]:
        return {"agent_id": self.agent_id, "seeds": self.seeds, "keys": self.keys}

    @classmethod
    def from_obj(cls, obj: dict[str, Any]) -> RevealMsg:
        """Validate."""
        cohort = _header(obj, cls.kind, cls.FIELDS)
        seeds = _bin_map(obj, "seeds", size=SHARE_BYTES)
        keys = _bin_map(obj, "keys", size=SHARE_BYTES)
        if seeds.keys() & keys.keys():
            raise _bad("a reveal gives both secrets of one device")
        return cls(cohort, _agent(obj), seeds, keys)


UpMessage = CheckIn | KeysMsg | SharesMsg | MaskedMsg | RevealMsg
_UP: dict[str, Any] = {m.kind: m for m in (CheckIn, KeysMsg, SharesMsg, MaskedMsg, RevealMsg)}


def decode_up(payload: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> UpMessage:
    """Decode what a device sent on its ``secagg/up`` topic (strict)."""
    obj = unpack(payload, limits)
    cls = _UP.get(obj.get("kind"))  # type: ignore[arg-type]
    if cls is None:
        raise DecodeError(
            RejectReason.WRONG_KIND, f"kind {str(obj.get('kind'))[:40]!r} is no secure-aggregation message"
        )
    result: UpMessage = cls.from_obj(obj)
    return result


# --- aggregator -> device -----------------------------------------------------------------------
@dataclass(frozen=True)
class Params:
    """How a cohort quantizes and weights (announced with every cohort and in the model message)."""

    bits: int = 32
    clip_norm: float = 4.0
    clip_range: float = 8.0
    staleness: str = "polynomial"
    staleness_a: float = 0.5
    staleness_b: int = 4
    max_staleness: int = 20
    dp_stddev: float = 0.0
    """Distributed DP (Kairouz, Liu, Steinke 2021): the standard deviation, in update units, of the
    discrete Gaussian noise that every released sum carries at least. 0: no distributed noise.
    Each device adds ``dp_stddev / sqrt(dp_survivors)`` (:func:`fedmq.secagg.ddp.cohort_params`)."""
    dp_survivors: int = 0
    """The fewest masked uploads a noised sum may hold (the ``t`` the noise is calibrated to). A device
    refuses to reveal its shares for a smaller sum, so no sum ever carries less than ``dp_stddev``."""
    dp_beta: float = 0.6065306597126334
    """Conditional randomized rounding's ``beta`` (``exp(-1/2)``, the paper's choice)."""

    @property
    def distributed_dp(self) -> bool:
        """Whether devices add distributed discrete Gaussian noise before masking."""
        return self.dp_stddev > 0

    def release(self, *, threshold: int, members: int, dim: int) -> DdgParams | None:
        """The release a sum of a cohort with ``threshold`` and ``members`` is, for inputs of ``dim`` values.

        The one derivation both ends use (:func:`fedmq.secagg.ddp.cohort_params`): the device
        noises with it, the aggregator decodes with it, and both ledgers charge it. No sum holds
        fewer than ``max(dp_survivors, threshold)`` uploads. ``None`` without distributed DP.
        """
        if not self.distributed_dp:
            return None
        return cohort_params(
            stddev=self.dp_stddev,
            survivors=max(self.dp_survivors, threshold),
            clip_norm=self.clip_norm,
            beta=self.dp_beta,
            bits=self.bits,
            members=members,
            dim=dim,
        )

    def to_wire(self) -> dict[str, Any]:
        """Plain map."""
        return dict(self.__dict__)

    @classmethod
    def from_wire(cls, obj: Any) -> Params:
        """Validate."""
        if not isinstance(obj, dict):
            raise _bad("params must be a map")
        staleness = obj.get("staleness")
        if staleness not in ("constant", "polynomial", "hinge"):
            raise _bad("staleness must be constant, polynomial or hinge")
        p = cls(
            _int(obj, "bits", 8, 62),
            _float(obj, "clip_norm") or 0.0,
            _float(obj, "clip_range") or 0.0,
            staleness,
            _float(obj, "staleness_a") or 0.0,
            _int(obj, "staleness_b", 0, 1 << 20),
            _int(obj, "max_staleness", 0, 1 << 20),
            # distributed DP: absent from an aggregator without it (read leniently: no schema bump)
            _float(obj, "dp_stddev", optional=True) or 0.0,
            _int(obj, "dp_survivors", 0, MAX_COHORT) if "dp_survivors" in obj else 0,
            beta if (beta := _float(obj, "dp_beta", optional=True)) is not None else cls.dp_beta,
        )
        if not (p.clip_norm > 0 and p.clip_range > 0 and p.staleness_a >= 0):
            raise _bad("clip_norm and clip_range must be > 0, staleness_a >= 0")
        if p.dp_stddev < 0 or not 0 < p.dp_beta < 1 or (p.distributed_dp and p.dp_survivors < 2):
            raise _bad("distributed DP needs dp_stddev >= 0, 0 < dp_beta < 1 and dp_survivors >= 2")
        return p


@dataclass(frozen=True)
class CohortMsg(_Message):
    """A cohort was formed: who is in it, its graph degree, threshold and deadline."""

    cohort: str
    members: tuple[str, ...]
    degree: int
    threshold: int
    params: Params
    version: int
    timeout: float
    """Seconds each round waits at most; a device gives up the cohort after five of them."""
    run: str | None = None
    kind: ClassVar[str] = "sa_cohort"

    def _wire(self) -> dict[str, Any]:
        return {
            "members": list(self.members), "degree": self.degree, "threshold": self.threshold,
            "params": self.params.to_wire(), "version": self.version, "timeout": self.timeout, "run": self.run,
        }  # fmt: skip

    @classmethod
    def from_obj(cls, obj: dict[str, Any]) -> CohortMsg:
        """Validate."""
        cohort = _header(obj, cls.kind, None)
        timeout = _float(obj, "timeout") or 0.0
        if not 0 < timeout <= 3600:
            raise _bad("timeout must be in (0, 3600] seconds")
        run = obj.get("run")
        return cls(
            cohort,
            _agents(obj, "members"),
            _int(obj, "degree", 1, MAX_COHORT),
            _int(obj, "threshold", 1, MAX_COHORT),
            Params.from_wire(obj.get("params")),
            _int(obj, "version"),
            timeout,
            run if isinstance(run, str) else None,
        )


@dataclass(frozen=True)
class RosterMsg(_Message):
    """The signed keys of the device's neighbours that advertised."""

    cohort: str
    keys: tuple[KeysMsg, ...]
    kind: ClassVar[str] = "sa_roster"

    def _wire(self) -> dict[str, Any]:
        return {"keys": [dict(k._wire()) for k in self.keys]}

    @classmethod
    def from_obj(cls, obj: dict[str, Any]) -> RosterMsg:
        """Validate."""
        cohort = _header(obj, cls.kind, None)
        keys = obj.get("keys")
        if not (isinstance(keys, list) and len(keys) <= MAX_COHORT and all(isinstance(k, dict) for k in keys)):
            raise _bad("keys must be a list of maps")
        return cls(cohort, tuple(KeysMsg.from_obj(k, strict=False) for k in keys))


@dataclass(frozen=True)
class RelayMsg(_Message):
    """The encrypted shares that the device's neighbours addressed to it."""

    cohort: str
    shares: dict[str, bytes]
    kind: ClassVar[str] = "sa_relay"

    def _wire(self) -> dict[str, Any]:
        return {"shares": self.shares}

    @classmethod
    def from_obj(cls, obj: dict[str, Any]) -> RelayMsg:
        """Validate."""
        return cls(_header(obj, cls.kind, None), _bin_map(obj, "shares", size=None, limit=512))


@dataclass(frozen=True)
class UnmaskMsg(_Message):
    """Who uploaded (reveal their seeds) and who dropped after sharing (reveal their mask keys)."""

    cohort: str
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]
    kind: ClassVar[str] = "sa_unmask"

    def _wire(self) -> dict[str, Any]:
        return {"survivors": list(self.survivors), "dropped": list(self.dropped)}

    @classmethod
    def from_obj(cls, obj: dict[str, Any]) -> UnmaskMsg:
        """Validate."""
        return cls(_header(obj, cls.kind, None), _agents(obj, "survivors"), _agents(obj, "dropped"))


DoneStatus = Literal["applied", "abandoned"]


@dataclass(frozen=True)
class DoneMsg(_Message):
    """The cohort ended: its sum was applied (``version``), or it was abandoned (``reason``)."""

    cohort: str
    status: DoneStatus
    version: int
    reason: str | None = None
    included: bool | None = None
    """Applied: whether this device's upload is in the sum (then its update is settled)."""
    kind: ClassVar[str] = "sa_done"

    def _wire(self) -> dict[str, Any]:
        return {"status": self.status, "version": self.version, "reason": self.reason, "included": self.included}

    @classmethod
    def from_obj(cls, obj: dict[str, Any]) -> DoneMsg:
        """Validate."""
        cohort = _header(obj, cls.kind, None)
        status = obj.get("status")
        if status not in ("applied", "abandoned"):
            raise _bad("status must be applied or abandoned")
        reason = obj.get("reason")
        included = obj.get("included")
        return cls(
            cohort,
            status,
            _int(obj, "version"),
            reason[:200] if isinstance(reason, str) else None,
            included if isinstance(included, bool) else None,
        )


DownMessage = CohortMsg | RosterMsg | RelayMsg | UnmaskMsg | DoneMsg
_DOWN: dict[str, Any] = {m.kind: m for m in (CohortMsg, RosterMsg, RelayMsg, UnmaskMsg, DoneMsg)}


def decode_down(payload: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> DownMessage:
    """Decode what the aggregator sent on a device's ``secagg/down`` topic."""
    obj = unpack(payload, limits)
    cls = _DOWN.get(obj.get("kind"))  # type: ignore[arg-type]
    if cls is None:
        raise DecodeError(
            RejectReason.WRONG_KIND, f"kind {str(obj.get('kind'))[:40]!r} is no secure-aggregation message"
        )
    result: DownMessage = cls.from_obj(obj)
    return result


__all__ = [
    "CheckIn", "CohortMsg", "DoneMsg", "DownMessage", "KeysMsg", "MaskedMsg", "Params", "RelayMsg",
    "RevealMsg", "RosterMsg", "SharesMsg", "UnmaskMsg", "UpMessage", "decode_down", "decode_up",
]  # fmt: skip
