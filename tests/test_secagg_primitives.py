"""Secure aggregation's building blocks against their definitions: Shamir, masks, quantization, crypto."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmq.secagg import crypto, shamir
from fedmq.secagg.graph import auto_degree, build_graph, threshold_for
from fedmq.secagg.quantize import dequantize, quantize, reduce, scale_for
from tests.cipher_rng import CipherRng

SECRETS = st.binary(min_size=32, max_size=32)


# --- Shamir ----------------------------------------------------------------------------------------
@given(secret=SECRETS, n=st.integers(2, 12), data=st.data())
@settings(max_examples=60, deadline=None)
def test_any_t_shares_reconstruct(secret: bytes, n: int, data: st.DataObject) -> None:
    t = data.draw(st.integers(1, n))
    shares = shamir.split(secret, t, list(range(1, n + 1)))
    subset = data.draw(st.lists(st.sampled_from(sorted(shares)), min_size=t, max_size=n, unique=True))
    assert shamir.combine({x: shares[x] for x in subset}, t) == secret


@given(secret_a=SECRETS, secret_b=SECRETS, n=st.integers(3, 10), data=st.data())
@settings(max_examples=60, deadline=None)
def test_t_minus_one_shares_are_consistent_with_every_secret(
    secret_a: bytes, secret_b: bytes, n: int, data: st.DataObject
) -> None:
    """Perfect secrecy: any t-1 shares of secret A are also t-1 shares of some polynomial through secret B.

    Given t-1 points and any value at 0, exactly one polynomial of degree t-1 passes through
    them all; so the t-1 shares say nothing about the secret. We build B's polynomial through
    A's t-1 shares and check that its remaining share reconstructs B, not A.
    """
    t = data.draw(st.integers(2, n))
    holders = list(range(1, n + 1))
    shares = shamir.split(secret_a, t, holders)
    seen = data.draw(st.lists(st.sampled_from(holders), min_size=t - 1, max_size=t - 1, unique=True))
    points = {x: shares[x] for x in seen}
    points[0] = int.from_bytes(secret_b, "big")  # the same t-1 shares, another secret
    other = next(x for x in holders if x not in seen)
    completed = {x: shares[x] for x in seen} | {other: shamir.interpolate(points, at=other)}
    assert shamir.combine(completed, t) == secret_b


def test_t_minus_one_shares_do_not_reconstruct() -> None:
    secret = bytes(range(32))
    shares = shamir.split(secret, 5, [1, 2, 3, 4, 5, 6, 7])
    with pytest.raises(shamir.ShareError, match="4 shares, 5 needed"):
        shamir.combine({x: shares[x] for x in (1, 2, 3, 4)}, 5)
    four = {x: shares[x] for x in (1, 2, 3, 4)}
    try:  # forcing 4 shares as if t were 4 gives garbage (almost always outside 256 bits), never the secret
        got: bytes | None = shamir.combine(four, 4)
    except shamir.ShareError:
        got = None
    assert got != secret


def test_shares_are_uniform_without_the_threshold() -> None:
    """One share of a threshold-2 sharing is uniform: over many sharings its top bits are balanced."""
    tops = [shamir.split(bytes(32), 2, [1, 2])[1] >> 520 for _ in range(2000)]
    assert 850 < sum(tops) < 1150  # fair coin, 2000 flips: 7 sigma


def test_a_wrong_share_is_found_and_named() -> None:
    secret = bytes([7]) * 32
    shares = shamir.split(secret, 3, [1, 2, 3, 4, 5])
    shares[2] = (shares[2] + 1) % shamir.PRIME
    got, bad = shamir.combine_checked(shares, 3, lambda s: s == secret)
    assert got == secret and bad == {2}
    with pytest.raises(shamir.ShareError, match="give a secret that checks"):
        shamir.combine_checked({1: shares[1], 2: shares[2], 3: shares[3]}, 3, lambda s: s == secret)


def test_share_bytes_are_checked() -> None:
    with pytest.raises(ValueError, match="66 bytes"):
        shamir.share_from_bytes(b"\x00" * 65)
    with pytest.raises(ValueError, match="outside the field"):
        shamir.share_from_bytes(b"\xff" * 66)
    assert shamir.share_from_bytes(shamir.share_to_bytes(12345)) == 12345


# --- masks -----------------------------------------------------------------------------------------
def test_masks_come_from_the_full_key() -> None:
    """Flower #7522: a mask seeded from 32 bits of the key. Here, keys differing in one bit anywhere differ."""
    key = bytes(32)
    base = crypto.expand_mask(key, 64, 32, domain=b"d")
    for byte in (0, 15, 31):
        flipped = bytearray(key)
        flipped[byte] ^= 0x80
        assert not np.array_equal(base, crypto.expand_mask(bytes(flipped), 64, 32, domain=b"d"))
    assert not np.array_equal(base, crypto.expand_mask(key, 64, 32, domain=b"e"))
    assert np.array_equal(base, crypto.expand_mask(key, 64, 32, domain=b"d"))
    assert int(base.max()) < 2**32


def test_pairwise_masks_cancel_exactly_mod_2_to_the_bits() -> None:
    rng = CipherRng(0)
    bits, n, devices = 32, 1000, ["a", "b", "c", "d"]
    priv = {d: crypto.new_key() for d in devices}
    pub = {d: crypto.public_bytes(k) for d, k in priv.items()}
    xs = {d: rng.integers(0, 2**bits, n, dtype=np.uint64) for d in devices}
    masked = {}
    for u in devices:
        y = xs[u].copy()
        for v in devices:
            if v != u:
                key = crypto.agree(priv[u], pub[v], purpose=crypto.MASK_PURPOSE, cohort="c" * 32, me=u, peer=v)
                m = crypto.expand_mask(key, n, bits, domain=b"pair")
                y += m if u < v else np.uint64(0) - m
        masked[u] = reduce(y, bits)
        assert not np.array_equal(masked[u], xs[u])
    total = reduce(sum(masked.values(), np.zeros(n, dtype=np.uint64)), bits)
    assert np.array_equal(total, reduce(sum(xs.values(), np.zeros(n, dtype=np.uint64)), bits))


@given(st.integers(1, 60), st.floats(0.1, 20), st.integers(0, 2**31))
@settings(max_examples=40, deadline=None)
def test_quantized_sums_are_within_the_bound(summands: int, clip: float, seed: int) -> None:
    rng = CipherRng(seed)
    bits = 32
    scale = scale_for(bits, clip, summands)
    xs = [rng.uniform(-clip, clip, 200) for _ in range(summands)]
    total = sum((quantize(x, scale=scale, clip_range=clip, bits=bits) for x in xs), np.zeros(200, np.uint64))
    got = dequantize(reduce(total, bits), scale=scale, bits=bits)
    assert np.abs(got - np.sum(xs, axis=0)).max() <= summands / scale
    extreme = [np.full(3, clip)] * summands  # the largest sum still fits the signed range
    q = sum((quantize(x, scale=scale, clip_range=clip, bits=bits) for x in extreme), np.zeros(3, np.uint64))
    assert np.allclose(dequantize(reduce(q, bits), scale=scale, bits=bits), summands * clip, atol=summands / scale)


def test_the_rounding_draws_cryptographic_uniforms() -> None:
    u = crypto.uniform(100_000)
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.005
    assert not np.array_equal(u[:100], crypto.uniform(100))  # a fresh key every time
    half = np.full(10, 0.5)
    assert np.array_equal(
        quantize(half, scale=1.0, clip_range=1.0, bits=32, uniform=lambda n: np.zeros(n)), np.ones(10)
    )


def test_stochastic_rounding_is_unbiased() -> None:
    scale = 4.0  # coarse on purpose
    x = np.full(200_000, 0.1)
    q = dequantize(quantize(x, scale=scale, clip_range=1.0, bits=32), scale=scale, bits=32)
    assert abs(q.mean() - 0.1) < 0.003 and set(np.unique(q)) == {0.0, 0.25}


# --- share encryption and signatures -----------------------------------------------------------------
def test_a_share_is_bound_to_cohort_sender_and_receiver() -> None:
    key = bytes(range(32))
    blob = crypto.encrypt_share(key, b"secret", cohort="c1", sender="a", receiver="b")
    assert crypto.decrypt_share(key, blob, cohort="c1", sender="a", receiver="b") == b"secret"
    for kw in ({"cohort": "c2", "sender": "a", "receiver": "b"}, {"cohort": "c1", "sender": "b", "receiver": "a"}):
        with pytest.raises(crypto.CryptoError, match="bad_share"):
            crypto.decrypt_share(key, blob, **kw)
    tampered = bytearray(blob)
    tampered[-1] ^= 1
    with pytest.raises(crypto.CryptoError, match="bad_share"):
        crypto.decrypt_share(key, bytes(tampered), cohort="c1", sender="a", receiver="b")


def test_a_low_order_public_key_is_refused() -> None:
    with pytest.raises(crypto.CryptoError, match="bad_key"):
        crypto.agree(crypto.new_key(), bytes(32), purpose=b"p", cohort="c", me="a", peer="b")


# --- graph -----------------------------------------------------------------------------------------
def test_the_graph_is_symmetric_and_of_the_degree() -> None:
    members = [f"d{i:03d}" for i in range(200)]
    k = auto_degree(200)
    assert k % 2 == 0 and 3 * 7.6 <= k <= 26
    g = build_graph("ab" * 16, members, k)
    for a, nbrs in g.neighbours.items():
        assert len(nbrs) == k and a not in nbrs
        assert all(a in g.neighbours[b] for b in nbrs)
    assert build_graph("ab" * 16, list(reversed(members)), k) == g  # order of the roster does not matter
    assert build_graph("cd" * 16, members, k).neighbours != g.neighbours  # another cohort, another ring
    small = build_graph("ab" * 16, members[:12], auto_degree(12))
    assert all(len(n) == 11 for n in small.neighbours.values())


def test_the_threshold_is_a_strict_majority() -> None:
    for holders in range(2, 60):
        t = threshold_for(holders, 0.51)
        assert 2 * t > holders and t <= max(holders, 2)
    with pytest.raises(ValueError, match=r"\(0.5, 1\]"):
        threshold_for(10, 0.5)


def test_a_uniform_stream_replays_one_aes_ctr_keystream_and_needs_a_full_key() -> None:
    key = bytes(range(32))
    a, b = crypto.UniformStream(key), crypto.UniformStream(key)
    first = np.concatenate([a(100), a(156)])
    assert np.array_equal(first, b(256))  # it continues the stream: two calls equal one call
    assert first.min() >= 0 and first.max() < 1 and abs(float(first.mean()) - 0.5) < 0.1
    assert not np.array_equal(first, crypto.UniformStream(bytes(32))(256))
    with pytest.raises(ValueError, match="32-byte key"):
        crypto.UniformStream(key[:16])


def test_the_tests_cipher_rng_is_deterministic_and_draws_in_range() -> None:
    """The secure-aggregation tests' inputs (tests/cipher_rng.py): same seed, same draws; the right ranges."""
    a, b = CipherRng(5), CipherRng(5)
    x = a.normal(0, 2, (50_000,))
    assert np.array_equal(x, b.normal(0, 2, (50_000,)))
    assert not np.array_equal(CipherRng(6).normal(0, 2, (50_000,)), x)
    assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 2) < 0.05
    u = a.uniform(-0.5, 0.5, (1000,))
    assert u.min() >= -0.5 and u.max() < 0.5 and isinstance(a.uniform(0.2, 1.0), float)
    ints = a.integers(-1000, 1000, 5000)
    assert ints.min() >= -1000 and ints.max() < 1000 and len(set(ints.tolist())) > 1500
    wide = a.integers(0, 2**32, 1000, dtype=np.uint64)
    assert wide.dtype == np.uint64 and int(wide.max()) < 2**32
