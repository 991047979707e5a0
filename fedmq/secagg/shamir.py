"""Shamir secret sharing of 32-byte secrets over the prime field GF(2^521 - 1).

Shamir, "How to share a secret", CACM 1979. A secret ``s`` (read as a 256-bit integer) is the
constant term of a random polynomial of degree ``t - 1``; holder ``x`` (an integer >= 1, its
1-based place in the cohort's roster) gets ``f(x)``. Any ``t`` shares determine ``f`` and so
``s`` (Lagrange interpolation at 0); any ``t - 1`` shares are uniformly distributed whatever
``s`` is, so they reveal nothing about it (``tests/test_secagg_primitives.py`` checks both).

The field is the Mersenne prime ``2^521 - 1``: larger than every 256-bit secret, so a secret
is one field element and no chunking is needed. The coefficients come from
:func:`secrets.randbelow` (the operating system's CSPRNG), injectable for tests.
"""

from __future__ import annotations

import functools
import itertools
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence

PRIME = (1 << 521) - 1
"""The field's modulus (a Mersenne prime)."""
SHARE_BYTES = 66
"""A share's value on the wire: big-endian, 66 bytes (521 bits)."""
SECRET_BYTES = 32


class ShareError(ValueError):
    """Shares that cannot reconstruct a secret (too few, duplicated holders, out of the field)."""


def split(
    secret: bytes,
    threshold: int,
    holders: Sequence[int],
    *,
    randbelow: Callable[[int], int] = secrets.randbelow,
) -> dict[int, int]:
    """Share ``secret`` (32 bytes) among ``holders`` so that any ``threshold`` of them reconstruct it."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"a secret is {SECRET_BYTES} bytes, got {len(secret)}")
    xs = list(holders)
    if len(set(xs)) != len(xs) or any(not 1 <= x < PRIME for x in xs):
        raise ValueError("holders must be distinct integers >= 1")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold must be in [1, {len(xs)}] holders, got {threshold}")
    coeffs = [int.from_bytes(secret, "big")] + [randbelow(PRIME) for _ in range(threshold - 1)]
    return {x: _evaluate(coeffs, x) for x in xs}


def _evaluate(coeffs: Sequence[int], x: int) -> int:
    acc = 0
    for c in reversed(coeffs):  # Horner
        acc = (acc * x + c) % PRIME
    return acc


def interpolate(shares: Mapping[int, int], at: int = 0) -> int:
    """The value at ``at`` of the polynomial of degree ``len(shares) - 1`` through ``shares``."""
    xs = tuple(sorted(shares))
    if not xs:
        raise ShareError("no shares")
    coeffs = lagrange_coefficients(xs, at)
    return sum(shares[x] * c for x, c in zip(xs, coeffs, strict=True)) % PRIME


@functools.lru_cache(maxsize=4096)
def lagrange_coefficients(xs: tuple[int, ...], at: int = 0) -> tuple[int, ...]:
    """``l_i(at)`` for the holders ``xs``: the weights that turn their shares into the value at ``at``.

    The same holders usually answer for every secret of a cohort, so the coefficients (one
    modular inversion per holder) are computed once per set and reused.
    """
    if len(set(xs)) != len(xs):
        raise ShareError("two shares for one holder")
    out = []
    for i in xs:
        num, den = 1, 1
        for j in xs:
            if j != i:
                num = num * (at - j) % PRIME
                den = den * (i - j) % PRIME
        out.append(num * pow(den, -1, PRIME) % PRIME)
    return tuple(out)


def combine(shares: Mapping[int, int], threshold: int) -> bytes:
    """Reconstruct the secret from exactly ``threshold`` shares (the first ones, by holder).

    Raises:
        ShareError: fewer than ``threshold`` shares, a value outside the field, or a result
            that is no 32-byte secret (shares of different secrets, or damaged ones).
    """
    if len(shares) < threshold:
        raise ShareError(f"{len(shares)} shares, {threshold} needed")
    chosen = {x: shares[x] for x in sorted(shares)[:threshold]}
    if any(not 0 <= y < PRIME or x < 1 for x, y in chosen.items()):
        raise ShareError("a share is outside the field")
    value = interpolate(chosen)
    if value >> (8 * SECRET_BYTES):
        raise ShareError("the shares do not belong to one 32-byte secret")
    return value.to_bytes(SECRET_BYTES, "big")


def combine_checked(
    shares: Mapping[int, int], threshold: int, check: Callable[[bytes], bool], *, max_tries: int = 64
) -> tuple[bytes, frozenset[int]]:
    """Reconstruct a secret that ``check`` can recognise, despite wrong shares among the extra ones.

    Tries windows of ``threshold`` consecutive holders, then every subset in order, at most
    ``max_tries``; once ``check`` accepts a candidate, every other share is tested against the
    polynomial it defines. Returns the secret and the holders whose shares were wrong.
    """
    if len(shares) < threshold:
        raise ShareError(f"{len(shares)} shares, {threshold} needed")
    xs = sorted(shares)
    for subset in _subsets(xs, threshold, max_tries):
        chosen = {x: shares[x] for x in subset}
        try:
            secret = combine(chosen, threshold)
        except ShareError:
            continue
        if not check(secret):
            continue
        bad = frozenset(x for x in xs if x not in chosen and interpolate(chosen, at=x) != shares[x] % PRIME)
        return secret, bad
    raise ShareError(f"no {threshold} of the {len(shares)} shares give a secret that checks")


def _subsets(xs: Sequence[int], k: int, limit: int) -> Iterable[tuple[int, ...]]:
    seen: set[tuple[int, ...]] = set()
    n = len(xs)
    windows = [tuple(xs[(i + j) % n] for j in range(k)) for i in range(n)]
    for combo in itertools.chain(windows, itertools.combinations(xs, k)):
        key = tuple(sorted(combo))
        if key in seen:
            continue
        seen.add(key)
        yield key
        if len(seen) >= limit:
            return


def share_to_bytes(value: int) -> bytes:
    """A share's value for the wire."""
    return value.to_bytes(SHARE_BYTES, "big")


def share_from_bytes(data: bytes) -> int:
    """Inverse of :func:`share_to_bytes`; ``ValueError`` for a wrong length or a value outside the field."""
    if len(data) != SHARE_BYTES:
        raise ValueError(f"a share is {SHARE_BYTES} bytes, got {len(data)}")
    value = int.from_bytes(data, "big")
    if value >= PRIME:
        raise ValueError("a share is outside the field")
    return value
