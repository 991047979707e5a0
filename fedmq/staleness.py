"""Staleness functions ``s(t - tau)`` that down-weight updates trained on old model versions.

From Xie, Koyejo, Gupta, "Asynchronous Federated Optimization", arXiv:1903.03934 (2019), sec. 5.2:

* constant:   ``s = 1``
* polynomial: ``s = (1 + staleness) ** -a``
* hinge:      ``s = 1`` if ``staleness <= b`` else ``1 / (a * (staleness - b) + 1)``

Every function returns a Python ``float`` in (0, 1] (a numpy float64 scalar would silently
promote float32 arithmetic downstream).
"""

from __future__ import annotations

from collections.abc import Callable

StalenessFn = Callable[[int], float]


def constant(staleness: int) -> float:
    """``s = 1``: every update counts fully."""
    _check(staleness)
    return 1.0


def polynomial(staleness: int, a: float = 0.5) -> float:
    """``s = (1 + staleness) ** -a``."""
    _check(staleness)
    if a < 0:
        raise ValueError(f"a must be >= 0, got {a}")
    return float((1.0 + staleness) ** -a)


def hinge(staleness: int, a: float = 10.0, b: int = 4) -> float:
    """``s = 1`` up to ``b`` versions behind, then ``1 / (a (staleness - b) + 1)``."""
    _check(staleness)
    if a < 0 or b < 0:
        raise ValueError(f"a and b must be >= 0, got a={a}, b={b}")
    return 1.0 if staleness <= b else 1.0 / (a * (staleness - b) + 1.0)


def make_staleness_fn(name: str, a: float = 0.5, b: int = 4) -> StalenessFn:
    """Return the staleness function ``name`` with its parameters bound."""
    if name == "constant":
        return constant
    if name == "polynomial":
        return lambda s: polynomial(s, a)
    if name == "hinge":
        return lambda s: hinge(s, a, b)
    raise ValueError(f"unknown staleness function {name!r} (constant, polynomial, hinge)")


def _check(staleness: int) -> None:
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness}")
