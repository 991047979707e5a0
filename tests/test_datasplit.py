"""The non-IID split at many devices, ``fedmq data split``, and the agent's input-range check."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from models.datasets import digits, dirichlet_split


def test_dirichlet_split_reaches_100_devices_on_digits() -> None:
    """The seed's failure: 1,437 examples, 100 devices, Dirichlet(0.5) and 10 each used to raise."""
    train, _ = digits()
    parts = dirichlet_split(train.y, 100, 0.5, np.random.default_rng(0), min_size=10)
    assert len(parts) == 100
    assert min(len(p) for p in parts) >= 10
    joined = np.concatenate(parts)
    assert len(joined) == len(train) and len(np.unique(joined)) == len(train)
    # Still non-IID: most devices are dominated by a few classes.
    top_share = [np.bincount(train.y[p], minlength=10).max() / len(p) for p in parts]
    assert float(np.median(top_share)) > 0.3


@settings(max_examples=40, deadline=None)
@given(n=st.integers(20, 400), parts=st.integers(1, 40), alpha=st.floats(0.01, 10), seed=st.integers(0, 2**16))
def test_dirichlet_split_is_a_partition_with_the_minimum(n: int, parts: int, alpha: float, seed: int) -> None:
    assume(n >= parts)
    y = np.random.default_rng(seed).integers(0, 5, size=n).astype(np.int64)
    min_size = max(1, min(10, n // parts))
    out = dirichlet_split(y, parts, alpha, np.random.default_rng(seed), min_size=min_size)
    assert len(out) == parts and min(len(p) for p in out) >= min_size
    joined = np.sort(np.concatenate(out))
    assert np.array_equal(joined, np.arange(n))


def test_dirichlet_split_names_what_is_impossible() -> None:
    with pytest.raises(ValueError, match="cannot give 100 parts of 10"):
        dirichlet_split(np.zeros(999, dtype=np.int64), 100, 0.5, np.random.default_rng(0), min_size=10)


def test_simulate_names_an_impossible_split_instead_of_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    from cli.main import main

    assert main(["simulate", "--agents", "2000", "--duration", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--agents" in err and "1437 training images, too few for 2000 devices" in err
    assert "Traceback" not in err
