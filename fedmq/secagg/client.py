"""The device side of secure aggregation: one state per round of the protocol, no I/O.

After Bonawitz et al. (CCS 2017) and SecAgg+ (Bell et al., CCS 2020), in the shape of Google
fcp's ``secagg_client_r*_state`` classes: a :class:`ClientSession` holds what one cohort needs
and delegates each incoming message to its current state object, which either moves it on
(returning the messages to publish) or refuses the message with a named reason.

Rounds, as the device sees them::

    CohortMsg  -> AdvertiseKeys  -> send KeysMsg       (two fresh X25519 key pairs, signed)
    RosterMsg  -> ShareKeys      -> send SharesMsg     (Shamir shares, AES-GCM per neighbour)
    RelayMsg   -> MaskedInput    -> wait for the input, then send MaskedMsg
    UnmaskMsg  -> Unmasking      -> send RevealMsg     (once; never both secrets of a device)
    DoneMsg    -> Completed | Aborted

A device **refuses the cohort** (state :class:`Aborted`, with a reason) when the aggregator
shows it something an honest aggregator never would: a roster key without a valid signature
(key substitution), keys of a device that is not its neighbour, a share that does not
authenticate, an unmask request that calls it dropped although it uploaded or asks for too
little. It then sends nothing more for that cohort; its update stays in its outbox for the next
one. A message that is merely out of place (a duplicate, another cohort's) is ignored and
reported as :class:`Ignored`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedmq.secagg import crypto, ddg_noise, ddp, shamir
from fedmq.secagg.graph import Graph, build_graph
from fedmq.secagg.messages import (
    CohortMsg,
    DoneMsg,
    DownMessage,
    KeysMsg,
    MaskedMsg,
    RelayMsg,
    RevealMsg,
    RosterMsg,
    SharesMsg,
    UnmaskMsg,
    UpMessage,
)
from fedmq.secagg.quantize import U64, quantize, reduce, scale_for, wire_dtype

SELF_DOMAIN = b"fedmq-secagg-self-mask-v1"
PAIR_DOMAIN = b"fedmq-secagg-pair-mask-v1"


# --- outputs ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Send:
    """Publish ``message`` on the device's ``secagg/up`` topic."""

    message: UpMessage


@dataclass(frozen=True)
class NeedInput:
    """The masks are ready: call :meth:`ClientSession.provide_input` with the update."""

    cohort: str


@dataclass(frozen=True)
class Finished:
    """The cohort ended (``applied`` or ``abandoned``)."""

    cohort: str
    status: str
    version: int
    reason: str | None
    included: bool = False
    """Applied with this device's upload in the sum."""


@dataclass(frozen=True)
class Refused:
    """The device left the cohort because the aggregator's message failed a check (``reason``)."""

    cohort: str
    reason: str
    detail: str


@dataclass(frozen=True)
class Ignored:
    """A message that does not fit the current state was ignored."""

    reason: str
    detail: str


Output = Send | NeedInput | Finished | Refused | Ignored


class _Refuse(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# --- the session -----------------------------------------------------------------------------------
@dataclass
class _Secrets:
    mask_key: X25519PrivateKey
    share_key: X25519PrivateKey
    seed: bytes = b""
    roster: dict[str, KeysMsg] = field(default_factory=dict)
    own_seed_share: int = 0
    own_key_share: int = 0
    held: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Neighbour -> (share of its seed, share of its mask key), from the relay."""
    share_keys: dict[str, bytes] = field(default_factory=dict)
    """Neighbour -> the AES-GCM key agreed with it (one X25519 exchange per pair, not two)."""


class ClientSession:
    """One device's part in one cohort.

    Args:
        agent_id: this device.
        cohort: the aggregator's announcement (validated here).
        now: the time it arrived (seconds); the session expires five round timeouts later.
        signer: the device's TLS identity, to sign its keys (``None``: unsigned keys).
        verifier: the federation CA, to check the roster (``None``: signatures are not checked,
            and the aggregator could substitute keys; the TLS deployment always has one).
        uniform: randomness for stochastic rounding (default: an AES-CTR stream under a fresh
            OS-random key, like every other random value of the protocol).
    """

    def __init__(
        self,
        agent_id: str,
        cohort: CohortMsg,
        *,
        now: float,
        signer: crypto.Signer | None = None,
        verifier: crypto.Verifier | None = None,
        uniform: crypto.Uniform = crypto.uniform,
        randbytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.agent_id = agent_id
        self.announce = cohort
        self.cohort = cohort.cohort
        self.params = cohort.params
        self.signer, self.verifier = signer, verifier
        self.uniform = uniform
        self.randbytes = randbytes
        self.deadline = now + 5 * cohort.timeout
        self.graph: Graph | None = None
        self.state: _State = _Start()
        self.refused: Refused | None = None
        self.input_seq: int | None = None
        """The seq of the update this session masked (once :meth:`provide_input` ran)."""
        self.release: ddp.DdgParams | None = None
        """Under distributed DP, the release the masked upload is (what the device's ledger charges)."""
        self._s = _Secrets(crypto.new_key(), crypto.new_key())

    # --- inputs ----------------------------------------------------------------------------
    def start(self) -> list[Output]:
        """Check the announcement and advertise this device's keys."""
        return self._run(lambda: self.state.start(self))

    def handle(self, message: DownMessage) -> list[Output]:
        """One message from the aggregator for this cohort."""
        if message.cohort != self.cohort:
            return [Ignored("wrong_cohort", f"a message for cohort {message.cohort[:8]}, this is {self.cohort[:8]}")]
        return self._run(lambda: self.state.handle(self, message))

    def provide_input(
        self, values: npt.NDArray[np.float64], *, seq: int, base_version: int, epsilon: float | None = None
    ) -> list[Output]:
        """The weighted, flattened update (:func:`weighted_input`): quantize, mask and upload it."""
        return self._run(lambda: self.state.provide_input(self, values, seq, base_version, epsilon))

    def expired(self, now: float) -> bool:
        """Whether the cohort is over for this device (finished, refused, or past its deadline)."""
        return isinstance(self.state, (Completed, Aborted)) or now >= self.deadline

    @property
    def waiting_for_input(self) -> bool:
        """The masks are ready and the update has not been given yet."""
        return isinstance(self.state, MaskedInput)

    @property
    def uploaded(self) -> bool:
        """The masked update was sent (the update is in this cohort's hands now)."""
        return isinstance(self.state, (Unmasking, Revealed)) or (
            isinstance(self.state, (Completed, Aborted)) and self.input_seq is not None
        )

    def _run(self, step: Callable[[], tuple[_State, list[Output]]]) -> list[Output]:
        try:
            self.state, out = step()
            return out
        except _Refuse as exc:
            self.state = Aborted()
            self.refused = Refused(self.cohort, exc.reason, exc.detail)
            self._s = _Secrets(self._s.mask_key, self._s.share_key)  # forget the shares held
            return [self.refused]

    # --- the work of the rounds ----------------------------------------------------------------
    def _advertise(self) -> tuple[_State, list[Output]]:
        c = self.announce
        if self.agent_id not in c.members:
            raise _Refuse("not_member", "the cohort does not list this device")
        try:
            self.graph = build_graph(self.cohort, c.members, c.degree)
        except ValueError as exc:
            raise _Refuse("bad_cohort", str(exc)) from None
        holders = c.degree + 1
        if not (2 <= c.threshold <= holders and 2 * c.threshold > holders):
            raise _Refuse(
                "bad_cohort", f"threshold {c.threshold} of {holders} holders is no strict majority (or impossible)"
            )
        mask_pk, share_pk = crypto.public_bytes(self._s.mask_key), crypto.public_bytes(self._s.share_key)
        cert = sig = None
        if self.signer is not None:
            cert = self.signer.cert_der
            sig = self.signer.sign(crypto.advert_payload(self.cohort, self.agent_id, mask_pk, share_pk))
        keys = KeysMsg(self.cohort, self.agent_id, mask_pk, share_pk, cert, sig)
        return AdvertiseKeys(), [Send(keys)]

    def _share(self, roster: RosterMsg) -> tuple[_State, list[Output]]:
        assert self.graph is not None
        mine = self.graph.neighbours[self.agent_id]
        entries: dict[str, KeysMsg] = {}
        for k in roster.keys:
            if k.agent_id not in mine:
                raise _Refuse("not_neighbour", f"the roster gives keys of {k.agent_id!r}, which is no neighbour")
            if k.agent_id in entries:
                raise _Refuse("bad_roster", f"the roster gives {k.agent_id!r} twice")
            if self.verifier is not None:
                payload = crypto.advert_payload(self.cohort, k.agent_id, k.mask_pk, k.share_pk)
                try:
                    self.verifier.verify(k.agent_id, payload, k.cert, k.sig)
                except crypto.CryptoError as exc:
                    raise _Refuse(exc.reason, exc.detail) from None
            entries[k.agent_id] = k
        if len({k.mask_pk for k in entries.values()} | {crypto.public_bytes(self._s.mask_key)}) != len(entries) + 1:
            raise _Refuse("bad_roster", "two devices advertise the same key")
        holders = [*entries, self.agent_id]
        t = self.announce.threshold
        if len(holders) < t:
            raise _Refuse("too_few", f"{len(holders)} holders advertised, the threshold is {t}")
        self._s.roster = entries
        self._s.seed = self.randbytes(shamir.SECRET_BYTES)
        xs = {a: self.graph.index(a) for a in holders}
        seed_shares = shamir.split(self._s.seed, t, list(xs.values()))
        key_shares = shamir.split(crypto.private_bytes(self._s.mask_key), t, list(xs.values()))
        self._s.own_seed_share, self._s.own_key_share = seed_shares[xs[self.agent_id]], key_shares[xs[self.agent_id]]
        out: dict[str, bytes] = {}
        for v, keys in entries.items():
            key = self._share_key(v, keys)
            plain = shamir.share_to_bytes(seed_shares[xs[v]]) + shamir.share_to_bytes(key_shares[xs[v]])
            out[v] = crypto.encrypt_share(key, plain, cohort=self.cohort, sender=self.agent_id, receiver=v)
        commit = crypto.seed_commitment(self._s.seed, self.cohort, self.agent_id)
        return ShareKeys(), [Send(SharesMsg(self.cohort, self.agent_id, commit, out))]

    def _share_key(self, peer: str, keys: KeysMsg) -> bytes:
        known = self._s.share_keys.get(peer)
        if known is not None:
            return known
        try:
            key = self._s.share_keys[peer] = crypto.agree(
                self._s.share_key,
                keys.share_pk,
                purpose=crypto.SHARE_PURPOSE,
                cohort=self.cohort,
                me=self.agent_id,
                peer=peer,
            )
        except crypto.CryptoError as exc:
            raise _Refuse(exc.reason, exc.detail) from None
        return key

    def _receive_shares(self, relay: RelayMsg) -> tuple[_State, list[Output]]:
        for v, blob in relay.shares.items():
            keys = self._s.roster.get(v)
            if keys is None:
                raise _Refuse("not_neighbour", f"a share from {v!r}, which is no neighbour with keys")
            try:
                plain = crypto.decrypt_share(
                    self._share_key(v, keys), blob, cohort=self.cohort, sender=v, receiver=self.agent_id
                )
                if len(plain) != 2 * shamir.SHARE_BYTES:
                    raise ValueError(f"a share pair of {len(plain)} bytes")
                b = shamir.share_from_bytes(plain[: shamir.SHARE_BYTES])
                s = shamir.share_from_bytes(plain[shamir.SHARE_BYTES :])
            except (crypto.CryptoError, ValueError) as exc:
                raise _Refuse("bad_share", f"the share from {v!r}: {exc}") from None
            self._s.held[v] = (b, s)
        if len(self._s.held) + 1 < self.announce.threshold:
            raise _Refuse("too_few", f"shares from {len(self._s.held)} neighbours, the threshold needs more")
        return MaskedInput(), [NeedInput(self.cohort)]

    def release_for(self, n_values: int) -> ddp.DdgParams | None:
        """The distributed-DP release an input of ``n_values`` would be in this cohort (``None``: no DP)."""
        return self.params.release(threshold=self.announce.threshold, members=len(self.announce.members), dim=n_values)

    def _mask(
        self, values: npt.NDArray[np.float64], seq: int, base_version: int, epsilon: float | None
    ) -> tuple[_State, list[Output]]:
        p = self.params
        release = self.release_for(values.size)
        if release is not None:  # scale, round within the charged bound, add this device's share of the noise
            ints = ddg_noise.encode(ddg_noise.device_input(values, p.clip_norm), release, p.bits, self.uniform)
        else:
            scale = scale_for(p.bits, p.clip_range, len(self.announce.members))
            ints = quantize(values, scale=scale, clip_range=p.clip_range, bits=p.bits, uniform=self.uniform)
        self.release = release
        masked = ints + crypto.expand_mask(self._s.seed, ints.size, p.bits, domain=SELF_DOMAIN)
        for v in self._s.held:  # the neighbours that shared: exactly the ones the aggregator can unmask
            masked += pair_mask(self, v, ints.size)
        data = reduce(masked, p.bits).astype(wire_dtype(p.bits)).tobytes()
        self.input_seq = seq
        return Unmasking(), [Send(MaskedMsg(self.cohort, self.agent_id, seq, base_version, data, epsilon))]

    def _reveal(self, req: UnmaskMsg) -> tuple[_State, list[Output]]:
        survivors, dropped = set(req.survivors), set(req.dropped)
        if survivors & dropped:
            raise _Refuse("bad_unmask", "a device is listed as uploaded and as dropped")
        if self.agent_id not in survivors:
            raise _Refuse("bad_unmask", "the request calls this device dropped, but it uploaded")
        if len(survivors) < self.announce.threshold:
            raise _Refuse("bad_unmask", f"{len(survivors)} uploads, fewer than the threshold {self.announce.threshold}")
        if self.params.distributed_dp and len(survivors) < self.params.dp_survivors:
            raise _Refuse(
                "too_little_noise",
                f"{len(survivors)} uploads, but the noise is calibrated to at least {self.params.dp_survivors}",
            )
        if (survivors | dropped) - set(self.announce.members):
            raise _Refuse("bad_unmask", "the request names devices outside the cohort")
        seeds = {self.agent_id: shamir.share_to_bytes(self._s.own_seed_share)}
        keys: dict[str, bytes] = {}
        for v, (b, s) in self._s.held.items():
            if v in survivors:
                seeds[v] = shamir.share_to_bytes(b)
            elif v in dropped:
                keys[v] = shamir.share_to_bytes(s)
        return Revealed(), [Send(RevealMsg(self.cohort, self.agent_id, seeds, keys))]


def pair_mask(session: ClientSession, peer: str, n: int) -> U64:
    """The pairwise mask this device adds for ``peer``: ``+PRG(s_uv)`` if ``u < v``, else ``-PRG(s_uv)``."""
    keys = session._s.roster[peer]
    try:
        key = crypto.agree(
            session._s.mask_key,
            keys.mask_pk,
            purpose=crypto.MASK_PURPOSE,
            cohort=session.cohort,
            me=session.agent_id,
            peer=peer,
        )
    except crypto.CryptoError as exc:
        raise _Refuse(exc.reason, exc.detail) from None
    mask = crypto.expand_mask(key, n, session.params.bits, domain=PAIR_DOMAIN)
    return mask if session.agent_id < peer else (mask.dtype.type(0) - mask)


# --- states ----------------------------------------------------------------------------------------
class _State:
    """A round of the protocol; each method returns ``(next_state, outputs)``."""

    name = "state"

    def start(self, s: ClientSession) -> tuple[_State, list[Output]]:
        return self, [Ignored("wrong_phase", f"start in state {self.name}")]

    def handle(self, s: ClientSession, m: DownMessage) -> tuple[_State, list[Output]]:
        if isinstance(m, DoneMsg):
            done: _State = Completed() if m.status == "applied" else Aborted()
            return done, [Finished(m.cohort, m.status, m.version, m.reason, m.included is True)]
        return self, [Ignored("wrong_phase", f"{m.kind} in state {self.name}")]

    def provide_input(
        self, s: ClientSession, values: npt.NDArray[np.float64], seq: int, base: int, eps: float | None
    ) -> tuple[_State, list[Output]]:
        return self, [Ignored("wrong_phase", f"an input in state {self.name}")]


class _Start(_State):
    name = "start"

    def start(self, s: ClientSession) -> tuple[_State, list[Output]]:
        return s._advertise()


class AdvertiseKeys(_State):
    """Round 0 done: keys sent, waiting for the neighbours' keys."""

    name = "advertise_keys"

    def handle(self, s: ClientSession, m: DownMessage) -> tuple[_State, list[Output]]:
        """One aggregator message in this state."""
        if isinstance(m, RosterMsg):
            return s._share(m)
        return super().handle(s, m)


class ShareKeys(_State):
    """Round 1 done: shares sent, waiting for the neighbours' shares."""

    name = "share_keys"

    def handle(self, s: ClientSession, m: DownMessage) -> tuple[_State, list[Output]]:
        """One aggregator message in this state."""
        if isinstance(m, RelayMsg):
            return s._receive_shares(m)
        return super().handle(s, m)


class MaskedInput(_State):
    """Round 2: shares held; waiting for the update to mask and upload."""

    name = "masked_input"

    def provide_input(
        self, s: ClientSession, values: npt.NDArray[np.float64], seq: int, base: int, eps: float | None
    ) -> tuple[_State, list[Output]]:
        """Mask and upload the update."""
        return s._mask(values, seq, base, eps)


class Unmasking(_State):
    """Round 2 done: masked update sent, waiting for the one unmask request."""

    name = "unmasking"

    def handle(self, s: ClientSession, m: DownMessage) -> tuple[_State, list[Output]]:
        """One aggregator message in this state."""
        if isinstance(m, UnmaskMsg):
            return s._reveal(m)
        return super().handle(s, m)


class Revealed(_State):
    """Round 3 done: shares revealed; a second unmask request is ignored (never answered twice)."""

    name = "revealed"


class Completed(_State):
    """The cohort's sum was applied."""

    name = "completed"

    def handle(self, s: ClientSession, m: DownMessage) -> tuple[_State, list[Output]]:
        """One aggregator message in this state."""
        return self, [Ignored("wrong_phase", f"{m.kind} after the cohort ended")]


class Aborted(_State):
    """The cohort was abandoned, or this device refused it."""

    name = "aborted"

    def handle(self, s: ClientSession, m: DownMessage) -> tuple[_State, list[Output]]:
        """One aggregator message in this state."""
        return self, [Ignored("wrong_phase", f"{m.kind} after the cohort ended")]


# --- the input -------------------------------------------------------------------------------------
def flatten(delta: dict[str, npt.NDArray[Any]]) -> npt.NDArray[np.float64]:
    """The tensors in name order as one float64 vector (the layout both sides use)."""
    return np.concatenate([np.asarray(delta[k], dtype=np.float64).ravel() for k in sorted(delta)])


def weighted_input(delta: dict[str, npt.NDArray[Any]], *, clip_norm: float, weight: float) -> npt.NDArray[np.float64]:
    """``[w * clip(delta), w]``: what a device masks (steps 1-2 of the masked upload).

    The delta is clipped to L2 norm ``clip_norm`` (a zero delta stays zero; no division by a
    zero norm), multiplied by its staleness weight ``w``, and the weight itself is appended, so
    the aggregator learns ``sum w_i delta_i`` and ``sum w_i`` and nothing per device.
    """
    if not (0 < weight <= 1 and clip_norm > 0):
        raise ValueError(f"need 0 < weight <= 1 and clip_norm > 0, got {weight}, {clip_norm}")
    flat = flatten(delta)
    if not np.isfinite(flat).all():
        raise ValueError("the update is not finite")
    wide = flat.astype(np.float64)
    norm = float(np.sqrt(np.sum(wide * wide)))  # not BLAS: agents run this in worker threads (see l2_norm)
    factor = weight * (min(1.0, clip_norm / norm) if norm > 0 else 1.0)
    return np.concatenate([flat * factor, [weight]])
