"""Precondition checks shared by the rules."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy.typing as npt

from fedmq.codec import all_finite


def same_layout(
    reference: Mapping[str, npt.NDArray[Any]], others: Sequence[Mapping[str, npt.NDArray[Any]]], what: str
) -> None:
    """Raise ValueError unless every mapping has the names and shapes of ``reference``."""
    for i, other in enumerate(others):
        if other.keys() != reference.keys():
            raise ValueError(f"{what} {i}: tensor names {sorted(other)} differ from {sorted(reference)}")
        for k, ref in reference.items():
            if other[k].shape != ref.shape:
                raise ValueError(f"{what} {i}: tensor {k!r} has shape {other[k].shape}, expected {ref.shape}")


def check_weights(weights: Sequence[float]) -> None:
    """Raise ValueError unless the weights are finite, non-negative and sum to > 0."""
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"weights must be finite and >= 0, got {list(weights)}")
    if not sum(weights) > 0:
        raise ValueError("weights sum to 0")


def finite_result(tensors: Mapping[str, npt.NDArray[Any]], what: str) -> Mapping[str, npt.NDArray[Any]]:
    """Return ``tensors`` if every value is finite, else raise ValueError naming ``what``.

    Rules check what they are about to return, so that nothing non-finite ever becomes a model
    version: inputs can be finite and their weighted sum still overflow.
    """
    bad = [k for k, v in tensors.items() if not all_finite(v)]
    if bad:
        raise ValueError(f"{what} would hold NaN or Inf in {sorted(bad)[:4]}")
    return tensors
