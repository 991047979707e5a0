"""The cryptography of secure aggregation, all of it from the ``cryptography`` package.

- **Key agreement**: X25519 (RFC 7748). Each device makes two fresh key pairs per cohort: one
  for the pairwise masks (``c``), one for encrypting shares (``s``), as in Bonawitz et al.
- **Key derivation**: HKDF-SHA256 (RFC 5869) over the raw 32-byte X25519 output, bound to the
  cohort id, the purpose and both device ids, so no key serves two purposes or two cohorts.
- **Share encryption**: AES-256-GCM under the derived key, a random 96-bit nonce, and the
  cohort id, sender and receiver as associated data: the aggregator that relays a share can
  neither read it nor redirect it to another device unnoticed.
- **Mask expansion**: AES-256-CTR keystream under the *full* 32-byte seed or agreed key,
  read as little-endian 32-bit words (64-bit above 32 bits) and reduced mod ``2^bits``. Never a non-cryptographic
  generator seeded from a truncated key (Flower issue #7522: a 32-bit seed is brute-forced).
- **Signatures**: ECDSA P-256 / SHA-256 with the device's TLS client key, over the public
  keys and the cohort id, verified against the federation CA (:func:`verify_advert`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KEY_BYTES = 32
NONCE_BYTES = 12
AGENT_ROLE = "agent"
"""The organizational unit ``fedmq broker init`` writes into a device certificate."""


class CryptoError(ValueError):
    """A signature, certificate or ciphertext that does not verify (``reason`` names which)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def new_key() -> X25519PrivateKey:
    """A fresh X25519 private key."""
    return X25519PrivateKey.generate()


def public_bytes(key: X25519PrivateKey) -> bytes:
    """The raw 32-byte public key of ``key``."""
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def private_bytes(key: X25519PrivateKey) -> bytes:
    """The raw 32-byte private key (what is Shamir-shared for a device that drops out)."""
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def key_from_private(raw: bytes) -> X25519PrivateKey:
    """Inverse of :func:`private_bytes`."""
    return X25519PrivateKey.from_private_bytes(raw)


def _pair_info(purpose: bytes, cohort: str, a: str, b: str) -> bytes:
    lo, hi = sorted((a, b))
    parts = [purpose, cohort.encode(), lo.encode(), hi.encode()]
    return b"".join(struct.pack(">H", len(p)) + p for p in parts)


def agree(private: X25519PrivateKey, peer_public: bytes, *, purpose: bytes, cohort: str, me: str, peer: str) -> bytes:
    """A 32-byte key both devices derive: HKDF-SHA256 of the X25519 shared secret, bound to the pair.

    Raises:
        CryptoError: ``bad_key`` for a public key that is not 32 bytes or gives the all-zero
            shared secret (a low-order point, RFC 7748 section 6.1).
    """
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:
        raise CryptoError("bad_key", f"the public key of {peer!r} is unusable: {exc}") from None
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=_pair_info(purpose, cohort, me, peer))
    return hkdf.derive(shared)


MASK_PURPOSE = b"fedmq-secagg-mask-v1"
SHARE_PURPOSE = b"fedmq-secagg-share-v1"


def _aad(cohort: str, sender: str, receiver: str) -> bytes:
    return _pair_info(b"fedmq-secagg-share-aad-v1", cohort, sender, receiver) + sender.encode()


def encrypt_share(key: bytes, plaintext: bytes, *, cohort: str, sender: str, receiver: str) -> bytes:
    """AES-256-GCM: ``nonce | ciphertext | tag``, bound to the cohort and the direction."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, _aad(cohort, sender, receiver))


def decrypt_share(key: bytes, blob: bytes, *, cohort: str, sender: str, receiver: str) -> bytes:
    """Inverse of :func:`encrypt_share`; ``CryptoError("bad_share")`` if it was altered or misdirected."""
    if len(blob) < NONCE_BYTES + 16:
        raise CryptoError("bad_share", f"a ciphertext of {len(blob)} bytes is too short")
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], _aad(cohort, sender, receiver))
    except InvalidTag:
        raise CryptoError("bad_share", f"the share from {sender!r} does not authenticate") from None


def expand_mask(seed: bytes, n: int, bits: int, *, domain: bytes) -> npt.NDArray[np.unsignedinteger[Any]]:
    """``n`` pseudorandom integers in ``[0, 2^bits)`` from a 32-byte seed: AES-256-CTR keystream.

    ``domain`` selects an independent stream for the same seed (its SHA-256 is the initial
    counter block), so a self mask and a pairwise mask never share a keystream.
    """
    if len(seed) != KEY_BYTES:
        raise ValueError(f"a mask seed is {KEY_BYTES} bytes, got {len(seed)}")
    if not 1 <= bits <= 64:
        raise ValueError(f"bits must be in [1, 64], got {bits}")
    counter = hashlib.sha256(domain).digest()[:16]
    enc = Cipher(algorithms.AES(seed), modes.CTR(counter)).encryptor()
    width = 4 if bits <= 32 else 8  # a 32-bit word per value when it is enough: half the keystream
    stream = enc.update(bytes(width * n)) + enc.finalize()
    words = np.frombuffer(stream, dtype="<u4" if width == 4 else "<u8")  # read-only: callers add it
    if bits < 8 * width:
        words = words & words.dtype.type((1 << bits) - 1)
    return words


Uniform = Callable[[int], npt.NDArray[np.float64]]
"""``n`` independent uniform draws in ``[0, 1)`` (what stochastic rounding needs)."""


def _to_unit(stream: bytes) -> npt.NDArray[np.float64]:
    """Keystream bytes as uniforms in ``[0, 1)``, 53 bits from each 64-bit word."""
    words = np.frombuffer(stream, dtype="<u8")
    return (words >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def uniform(n: int) -> npt.NDArray[np.float64]:
    """``n`` uniforms in ``[0, 1)`` with 53 random bits each, from AES-256-CTR under a fresh OS-random key.

    The rounding of a masked update is randomness of the protocol like the masks, so it comes
    from a cryptographic stream too, not from a seedable statistical generator.
    """
    enc = Cipher(algorithms.AES(os.urandom(KEY_BYTES)), modes.CTR(bytes(16))).encryptor()
    return _to_unit(enc.update(bytes(8 * n)) + enc.finalize())


class UniformStream:
    """A :data:`Uniform` that continues one AES-256-CTR keystream under a given full 32-byte key.

    The same key gives the same draws: tests use it to replay protocol randomness (rounding,
    DP noise) without falling back to a statistical generator. Devices use :func:`uniform`.
    """

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"need a {KEY_BYTES}-byte key, got {len(key)} bytes")
        self._enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()

    def __call__(self, n: int) -> npt.NDArray[np.float64]:
        """The next ``n`` uniforms of the stream."""
        return _to_unit(self._enc.update(bytes(8 * n)))


def seed_commitment(seed: bytes, cohort: str, agent: str) -> bytes:
    """SHA-256 commitment to a self-mask seed: lets the aggregator recognise the right reconstruction."""
    return hashlib.sha256(b"fedmq-secagg-seed-v1" + _pair_info(b"", cohort, agent, agent) + seed).digest()


# --- signatures with the TLS identity ------------------------------------------------------------
def advert_payload(cohort: str, agent: str, mask_pk: bytes, share_pk: bytes) -> bytes:
    """What a device signs: the cohort, its id and both public keys, length-prefixed."""
    parts = [b"fedmq-secagg-advert-v1", cohort.encode(), agent.encode(), mask_pk, share_pk]
    return b"".join(struct.pack(">H", len(p)) + p for p in parts)


@dataclass(frozen=True)
class Signer:
    """A device's TLS identity: its certificate (DER, sent along) and private key."""

    cert_der: bytes
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def from_files(cls, cert_file: str, key_file: str) -> Signer:
        """Load the PEM files the broker connection uses."""
        with open(cert_file, "rb") as fh:
            cert = x509.load_pem_x509_certificate(fh.read())
        with open(key_file, "rb") as fh:
            key = serialization.load_pem_private_key(fh.read(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_file}: secure aggregation signs with an EC key, got {type(key).__name__}")
        return cls(cert.public_bytes(serialization.Encoding.DER), key)

    def sign(self, payload: bytes) -> bytes:
        """ECDSA-SHA256 over ``payload``."""
        return self.key.sign(payload, ec.ECDSA(hashes.SHA256()))


class Verifier:
    """Checks a device's signed keys against the federation CA.

    A valid advert carries a certificate that the CA issued directly, that is valid now, whose
    common name is the device id the roster gives, whose organizational unit is ``agent``
    (the aggregator's own certificate cannot pass for a device), whose extended key usage is
    client authentication, and whose key signed the advert.
    """

    def __init__(self, ca_cert: x509.Certificate) -> None:
        self.ca = ca_cert

    @classmethod
    def from_file(cls, ca_file: str) -> Verifier:
        """Load the CA certificate (PEM)."""
        with open(ca_file, "rb") as fh:
            return cls(x509.load_pem_x509_certificate(fh.read()))

    def verify(self, agent: str, payload: bytes, cert_der: bytes | None, signature: bytes | None) -> None:
        """Raise :class:`CryptoError` (``bad_signature``) unless ``agent`` signed ``payload``."""
        if cert_der is None or signature is None:
            raise CryptoError("bad_signature", f"{agent!r} sent its keys unsigned")
        try:
            cert = x509.load_der_x509_certificate(cert_der)
        except ValueError:
            raise CryptoError("bad_signature", f"{agent!r} sent a certificate that does not parse") from None
        try:
            cert.verify_directly_issued_by(self.ca)
        except (ValueError, TypeError, InvalidSignature):
            raise CryptoError(
                "bad_signature", f"the certificate of {agent!r} is not issued by the federation CA"
            ) from None
        now = dt.datetime.now(dt.UTC)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise CryptoError("bad_signature", f"the certificate of {agent!r} is not valid now")
        cn = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        if cn != [agent]:
            raise CryptoError("bad_signature", f"the certificate names {cn!r}, the roster {agent!r}")
        ou = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]
        if ou != [AGENT_ROLE]:
            raise CryptoError(
                "bad_signature", f"the certificate of {agent!r} is no device certificate (OU {ou!r}; re-issue it)"
            )
        try:
            eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            eku = None
        if eku is None or ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
            raise CryptoError("bad_signature", f"the certificate of {agent!r} is not for client authentication")
        public = cert.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise CryptoError("bad_signature", f"the certificate of {agent!r} has no EC key")
        try:
            public.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise CryptoError("bad_signature", f"the keys of {agent!r} do not carry its signature") from None
