"""Data sources for agents and evaluation, and the non-IID Dirichlet split used in simulation.

Nothing is downloaded: the built-in data is scikit-learn's bundled digits set.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class Dataset:
    """Features ``x`` (float32, ``(n, features)``) and integer labels ``y`` (int64, ``(n,)``)."""

    x: npt.NDArray[np.float32]
    y: npt.NDArray[np.int64]

    def __post_init__(self) -> None:
        if self.x.ndim != 2 or self.y.ndim != 1 or len(self.x) != len(self.y):
            raise ValueError(f"need x of shape (n, features) and y of shape (n,), got {self.x.shape}, {self.y.shape}")

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: npt.NDArray[np.intp]) -> Dataset:
        """The rows ``idx``."""
        return Dataset(self.x[idx], self.y[idx])


def as_dataset(x: Any, y: Any) -> Dataset:
    """Validate and convert arrays into a :class:`Dataset` (images are flattened)."""
    xa = np.asarray(x, dtype=np.float32)
    ya = np.asarray(y)
    if xa.ndim > 2:
        xa = xa.reshape(len(xa), -1)
    if not np.issubdtype(ya.dtype, np.integer):
        raise ValueError(f"labels must be integers, got {ya.dtype}")
    if not np.isfinite(xa).all():
        raise ValueError("features contain NaN or Inf")
    return Dataset(np.ascontiguousarray(xa), ya.astype(np.int64))


def digits(test_fraction: float = 0.2, seed: int = 0) -> tuple[Dataset, Dataset]:
    """scikit-learn's bundled 8x8 digits (1,797 images), scaled to [0, 1], split stratified."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    return Dataset(xtr, ytr), Dataset(xte, yte)


def dirichlet_split(
    y: npt.NDArray[np.int64],
    parts: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 10,
    max_tries: int = 100,
) -> list[npt.NDArray[np.intp]]:
    """Split indices non-IID: each class is divided among ``parts`` with Dirichlet(alpha) shares.

    Smaller ``alpha`` is more skewed (Hsu, Qi, Brown 2019, arXiv:1909.06335). The draw is
    repeated until every part has at least ``min_size`` examples. When ``max_tries`` draws all
    leave a part short, as at many parts and small alpha, the last draw is repaired: a short part
    takes examples from the largest part until it has ``min_size``. That only moves examples from
    the largest parts, so the skew of the others is kept.

    Raises:
        ValueError: ``parts < 1``, ``alpha <= 0``, or fewer than ``parts * min_size`` examples.
    """
    if parts < 1 or alpha <= 0 or min_size < 0:
        raise ValueError("need parts >= 1, alpha > 0 and min_size >= 0")
    if len(y) < parts * min_size:
        raise ValueError(
            f"{len(y)} examples cannot give {parts} parts of {min_size}: use fewer devices or a larger data set"
        )
    buckets: list[list[int]] = []
    for _ in range(max(1, max_tries)):
        buckets = [[] for _ in range(parts)]
        for c in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == c))
            shares = rng.dirichlet(np.full(parts, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for b, chunk in zip(buckets, np.split(idx, cuts), strict=True):
                b.extend(chunk.tolist())
        if min(len(b) for b in buckets) >= min_size:
            break
    else:
        for b in sorted(buckets, key=len):
            while len(b) < min_size:
                donor = max(buckets, key=len)
                b.append(donor.pop(int(rng.integers(len(donor)))))
    return [np.array(sorted(b), dtype=np.intp) for b in buckets]


def range_mismatch(x: npt.NDArray[np.float32], expected: tuple[float, float]) -> str | None:
    """Say how local features ``x`` fail to match the range a model expects, or ``None`` when they fit.

    Data is flagged when it reaches more than half the expected width beyond either end (raw
    0-16 digits pixels against [0, 1]), or when it spans under a tenth of that width (data
    divided twice). Both make SGD crawl without any error.
    """
    if x.size == 0:
        return None
    lo, hi = expected
    width = hi - lo
    dmin, dmax = float(np.min(x)), float(np.max(x))
    where = f"the local data lies in [{dmin:.4g}, {dmax:.4g}] but the model expects inputs in [{lo:.4g}, {hi:.4g}]"
    if dmin < lo - 0.5 * width or dmax > hi + 0.5 * width:
        return f"{where}: scale it as the model's recipe says (docs/protocol.md, 'Input normalisation')"
    if dmax - dmin < 0.1 * width:
        return f"{where}: it uses under a tenth of that range; was it scaled twice? (docs/protocol.md)"
    return None


def load_source(spec: str) -> Dataset:
    """Load a local data source.

    ``spec`` is one of:
      * a ``.npz`` file with arrays ``x`` and ``y``;
      * a folder with ``x.npy`` and ``y.npy`` (or one ``data.npz``);
      * ``builtin:digits-train`` / ``builtin:digits-test`` (the seed-0 split of :func:`digits`);
      * ``package.module:function``, a callable returning ``(x, y)``.

    Arrays are loaded with ``allow_pickle=False``.
    """
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name not in ("digits-train", "digits-test"):
            raise ValueError(f"unknown built-in data set {name!r} (digits-train, digits-test)")
        train, test = digits()
        return train if name == "digits-train" else test
    path = Path(spec)
    if path.is_dir():
        if (path / "data.npz").is_file():
            path = path / "data.npz"
        else:
            try:
                return as_dataset(
                    np.load(path / "x.npy", allow_pickle=False), np.load(path / "y.npy", allow_pickle=False)
                )
            except FileNotFoundError as exc:
                raise ValueError(f"folder {spec} has neither data.npz nor x.npy + y.npy") from exc
    if path.suffix == ".npz":
        if not path.is_file():
            raise ValueError(f"no such file: {spec}")
        with np.load(path, allow_pickle=False) as f:
            if "x" not in f or "y" not in f:
                raise ValueError(f"{spec} must hold arrays named x and y, has {sorted(f.files)}")
            return as_dataset(f["x"], f["y"])
    if ":" in spec:
        module_name, func_name = spec.split(":", 1)
        func = getattr(importlib.import_module(module_name), func_name)
        x, y = func()
        return as_dataset(x, y)
    raise ValueError(f"data source {spec!r}: expected a .npz file, a folder, builtin:NAME or module:function")


def load_inputs(spec: str) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64] | None]:
    """Load inputs to predict on: like :func:`load_source`, but labels are optional.

    A ``.npz`` with only ``x`` (or a folder with only ``x.npy``) gives ``(x, None)``.
    """
    path = Path(spec)
    if path.is_dir() and not (path / "data.npz").is_file() and (path / "x.npy").is_file():
        if not (path / "y.npy").is_file():
            return _features(np.load(path / "x.npy", allow_pickle=False)), None
    elif path.suffix == ".npz" and path.is_file():
        with np.load(path, allow_pickle=False) as f:
            if "x" not in f:
                raise ValueError(f"{spec} must hold an array named x (and optionally y), has {sorted(f.files)}")
            if "y" not in f:
                return _features(f["x"]), None
    data = load_source(spec)
    return data.x, data.y


def _features(x: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """Features alone, checked as :func:`as_dataset` checks them."""
    xa = np.asarray(x, dtype=np.float32)
    if xa.ndim < 2 or len(xa) == 0:
        raise ValueError(f"x must be a non-empty array of examples, got shape {xa.shape}")
    xa = xa.reshape(len(xa), -1)
    if not np.isfinite(xa).all():
        raise ValueError("features contain NaN or Inf")
    return np.ascontiguousarray(xa)


def save_npz(path: str | Path, data: Dataset) -> None:
    """Write a data set as a ``.npz`` that :func:`load_source` reads."""
    np.savez(path, x=data.x, y=data.y)
