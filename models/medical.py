"""Hospital data: scikit-learn's breast-cancer set split across hospitals, and a generated image set.

Nothing is downloaded. Two data sets serve the hospital example:

* **Breast cancer (real data).** scikit-learn ships the Wisconsin Diagnostic Breast Cancer set:
  569 cases, 30 features computed from digitised images of fine-needle aspirates of breast
  masses (radius, texture, concavity and so on: mean, standard error and worst value of each),
  labelled benign or malignant (Street, Wolberg, Mangasarian 1993). :func:`breast_cancer_hospitals`
  keeps a stratified fifth as a held-out test set and splits the rest across hospitals of very
  different sizes and case mixes. A referral centre sees mostly malignant cases and a screening
  clinic mostly benign ones. Each hospital's image digitisation has its own calibration, a
  multiplicative gain on the size and texture features, so the features are skewed too.
* **Synthetic cell images (generated).** No medical image set ships inside an installable package.
  MedMNIST and the like download their images at run time. :func:`cell_images` therefore draws
  28 x 28 grey images of one stylised cell each, in four classes. It is a shape-recognition task
  that exercises the imaging CNN, a per-hospital scanner shift (contrast, brightness, blur and
  noise) and label skew. **It is not medical data**: a model trained on it says nothing about
  real cytology, and it must not be presented as if it did.

Normalisation is part of the model's contract (``docs/protocol.md``). Breast-cancer features are
min-max scaled with :data:`BREAST_CANCER_RANGES`, the published per-feature minimum and maximum
of the data set (the same table as scikit-learn's description of it). Every hospital uses those
constants and never its own statistics. Cell images are in [0, 1].
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import numpy.typing as npt

from models.datasets import Dataset

BREAST_CANCER_CLASSES = ("malignant", "benign")  # scikit-learn's target order
CELL_CLASSES = ("normal", "enlarged-nucleus", "multinucleated", "irregular")
CELL_SIZE = 28


@dataclass(frozen=True)
class Hospital:
    """One hospital of the example: its share of cases, its case mix and its equipment."""

    name: str
    share: float
    """Fraction of the training cases it holds."""
    positive_rate: float
    """Fraction of its cases in class 0 (malignant, or abnormal for cells)."""
    gain: float
    """Calibration of its digitisation: multiplies size/texture features, or image contrast."""
    blur: float
    noise: float


HOSPITALS = (
    Hospital("university-hospital", 0.40, 0.35, 1.00, 0.0, 0.03),
    Hospital("regional-referral-centre", 0.25, 0.60, 1.06, 0.6, 0.05),
    Hospital("city-general", 0.17, 0.30, 0.95, 0.3, 0.08),
    Hospital("screening-clinic", 0.12, 0.10, 1.03, 0.9, 0.10),
    Hospital("rural-clinic", 0.06, 0.25, 0.92, 1.2, 0.15),
)
"""Five hospitals: shares from 40 % down to 6 %, malignancy from 10 % to 60 % (37 % overall, as in the data)."""

_GAIN_FEATURES = (0, 1, 2, 3, 10, 11, 12, 13, 20, 21, 22, 23)  # radius, texture, perimeter, area


@lru_cache(maxsize=1)
def _breast_cancer_raw() -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    return np.asarray(bunch.data, dtype=np.float64), np.asarray(bunch.target, dtype=np.int64)


def breast_cancer_ranges() -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Per-feature (minimum, maximum) of the published data set: the agreed scaling constants."""
    x, _ = _breast_cancer_raw()
    return x.min(axis=0), x.max(axis=0)


def normalize_breast_cancer(x: npt.NDArray[np.floating]) -> npt.NDArray[np.float32]:
    """Min-max scale raw breast-cancer features with the published ranges (values slightly outside [0, 1] stay)."""
    lo, hi = breast_cancer_ranges()
    return ((np.asarray(x, dtype=np.float64) - lo) / (hi - lo)).astype(np.float32)


def _case_mix_split(
    y: npt.NDArray[np.int64], hospitals: tuple[Hospital, ...], rng: np.random.Generator
) -> list[npt.NDArray[np.intp]]:
    """Deal indices so each hospital gets about its share of cases at its rate of class 0."""
    pools = {c: list(rng.permutation(np.flatnonzero(y == c))) for c in (0, 1)}
    n = len(y)
    wanted = [(h, max(4, round(h.share * n))) for h in hospitals]
    out: list[list[int]] = [[] for _ in hospitals]
    for i, (h, size) in enumerate(wanted):
        pos = min(len(pools[0]), round(size * h.positive_rate))
        neg = min(len(pools[1]), size - pos)
        out[i] += [pools[0].pop() for _ in range(pos)] + [pools[1].pop() for _ in range(neg)]
    for c in (0, 1):  # whatever rounding left over goes to the largest hospital
        out[0] += pools[c]
    return [np.array(sorted(o), dtype=np.intp) for o in out]


def breast_cancer_hospitals(
    seed: int = 0, hospitals: tuple[Hospital, ...] = HOSPITALS, test_fraction: float = 0.2
) -> tuple[list[Dataset], Dataset]:
    """Normalised breast-cancer shards, one per hospital, and the held-out test set (no site shift).

    Label 0 is malignant, 1 benign (scikit-learn's coding).
    """
    from sklearn.model_selection import train_test_split

    x, y = _breast_cancer_raw()
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=test_fraction, random_state=seed, stratify=y)
    rng = np.random.default_rng([seed, 11])
    shards = []
    for h, part in zip(hospitals, _case_mix_split(y[idx_train], hospitals, rng), strict=True):
        xs = x[idx_train][part].copy()
        xs[:, _GAIN_FEATURES] *= h.gain
        shards.append(Dataset(normalize_breast_cancer(xs), y[idx_train][part]))
    return shards, Dataset(normalize_breast_cancer(x[idx_test]), y[idx_test])


def _blur(img: npt.NDArray[np.float64], sigma: float) -> npt.NDArray[np.float64]:
    if sigma <= 0:
        return img
    r = max(1, int(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    img = np.apply_along_axis(lambda v: np.convolve(v, k, mode="same"), 0, img)
    return np.apply_along_axis(lambda v: np.convolve(v, k, mode="same"), 1, img)


def _cell(label: int, rng: np.random.Generator, h: Hospital) -> npt.NDArray[np.float32]:
    """One 28 x 28 image of a stylised cell of class ``label`` as hospital ``h``'s scanner sees it."""
    yy, xx = np.mgrid[0:CELL_SIZE, 0:CELL_SIZE].astype(np.float64)
    cy, cx = rng.uniform(11, 17, size=2)
    theta = rng.uniform(0, np.pi)
    a = rng.uniform(7.0, 10.0)
    b = a * rng.uniform(0.7, 1.0)
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    r = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    if label == 3:  # irregular membrane: the radius wobbles with the angle
        ang = np.arctan2(v, u)
        r = r * (1 + 0.22 * np.sin(rng.integers(4, 8) * ang + rng.uniform(0, 2 * np.pi)))
    img = 0.35 * (r < 1.0) + 0.15 * np.exp(-((r - 1.0) ** 2) / 0.01)  # cytoplasm and membrane
    nuclei = 2 + int(rng.integers(0, 2)) if label == 2 else 1
    size = rng.uniform(0.45, 0.6) if label == 1 else rng.uniform(0.22, 0.32)
    for k in range(nuclei):
        off = (k - (nuclei - 1) / 2) * 0.55 * a if nuclei > 1 else 0.0
        ny, nx = cy + off * np.sin(theta), cx + off * np.cos(theta)
        rad = size * (b if nuclei == 1 else 0.75 * b)
        img += 0.5 * (np.sqrt((yy - ny) ** 2 + (xx - nx) ** 2) < rad)
    img = _blur(img, h.blur) * h.gain + 0.05 * (h.gain - 1.0) * 10
    img += rng.normal(0.0, h.noise, img.shape)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def cell_images(n: int, seed: int, hospital: Hospital | None = None, positive_rate: float | None = None) -> Dataset:
    """``n`` synthetic cell images (flattened 784 values in [0, 1]) with labels in :data:`CELL_CLASSES`.

    Class 0 ("normal") has probability ``1 - positive_rate``; the three abnormal classes share the
    rest. Without a ``hospital`` the images are as a reference scanner makes them.
    """
    h = hospital or Hospital("reference", 1.0, 0.5, 1.0, 0.3, 0.05)
    rate = h.positive_rate if positive_rate is None else positive_rate
    rng = np.random.default_rng([seed, 29, zlib.crc32(h.name.encode()) if hospital else 0])
    probs = np.array([1 - rate, rate / 3, rate / 3, rate / 3])
    labels = rng.choice(len(CELL_CLASSES), size=n, p=probs)
    x = np.stack([_cell(int(c), rng, h).reshape(-1) for c in labels]) if n else np.zeros((0, 784), np.float32)
    return Dataset(x.astype(np.float32), labels.astype(np.int64))


def cell_hospitals(
    seed: int = 0, total: int = 3000, hospitals: tuple[Hospital, ...] = HOSPITALS, test_size: int = 800
) -> tuple[list[Dataset], Dataset]:
    """Synthetic cell images for each hospital (sizes by share, case mix and scanner skew) and a balanced test set."""
    shards = [cell_images(max(20, round(h.share * total)), seed, h) for h in hospitals]
    return shards, cell_images(test_size, seed + 1_000_003, positive_rate=0.75)
