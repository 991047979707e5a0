"""Pure-numpy models trained with minibatch SGD in float32: the default backend (no torch)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from models.base import Tensors, TrainingCancelled, TrainResult, check_compatible, softmax


class _NumpyModel:
    name = "numpy"
    _w: Tensors

    def get_weights(self) -> Tensors:
        return {k: v.copy() for k, v in self._w.items()}

    def set_weights(self, weights: Mapping[str, npt.NDArray[Any]]) -> None:
        check_compatible(self._w, weights)
        for k, v in weights.items():
            np.copyto(self._w[k], v)

    def _grads(self, x: npt.NDArray[np.float32], y: npt.NDArray[np.int64]) -> tuple[float, Tensors]:
        raise NotImplementedError

    def fit(
        self,
        x: npt.NDArray[np.float32],
        y: npt.NDArray[np.int64],
        *,
        epochs: int,
        batch_size: int,
        lr: float,
        rng: np.random.Generator,
        stop: Callable[[], bool] | None = None,
    ) -> TrainResult:
        """Minibatch SGD on cross-entropy; returns the last epoch's mean loss.

        ``stop``: see :class:`~models.base.Model`.
        """
        n = len(x)
        if n == 0:
            raise ValueError("cannot train on an empty data set")
        step = np.float32(lr)
        loss_sum = 0.0
        for _ in range(epochs):
            order = rng.permutation(n)
            loss_sum = 0.0
            for start in range(0, n, batch_size):
                if stop is not None and stop():
                    raise TrainingCancelled
                idx = order[start : start + batch_size]
                loss, grads = self._grads(x[idx], y[idx])
                loss_sum += loss * len(idx)
                for k, g in grads.items():
                    self._w[k] -= step * g
        return TrainResult(num_examples=n, loss=loss_sum / n)


class SoftmaxRegression(_NumpyModel):
    """Multinomial logistic regression: ``p = softmax(x W + b)``."""

    name = "softmax"

    def __init__(self, num_features: int, num_classes: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self._w = {
            "W": (rng.standard_normal((num_features, num_classes)) * 0.01).astype(np.float32),
            "b": np.zeros(num_classes, dtype=np.float32),
        }

    def predict_proba(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Class probabilities."""
        return softmax(x @ self._w["W"] + self._w["b"])

    def _grads(self, x: npt.NDArray[np.float32], y: npt.NDArray[np.int64]) -> tuple[float, Tensors]:
        p = self.predict_proba(x)
        n = len(y)
        loss = float(-np.mean(np.log(np.clip(p[np.arange(n), y], 1e-12, 1.0))))
        p[np.arange(n), y] -= 1.0
        p /= np.float32(n)
        return loss, {"W": x.T @ p, "b": p.sum(axis=0)}


class MLP(_NumpyModel):
    """One hidden ReLU layer: ``p = softmax(relu(x W1 + b1) W2 + b2)`` with He initialisation."""

    name = "mlp"

    def __init__(self, num_features: int, num_classes: int, hidden: int = 64, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self._w = {
            "W1": (rng.standard_normal((num_features, hidden)) * np.sqrt(2.0 / num_features)).astype(np.float32),
            "b1": np.zeros(hidden, dtype=np.float32),
            "W2": (rng.standard_normal((hidden, num_classes)) * np.sqrt(1.0 / hidden)).astype(np.float32),
            "b2": np.zeros(num_classes, dtype=np.float32),
        }

    def predict_proba(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Class probabilities."""
        h = np.maximum(x @ self._w["W1"] + self._w["b1"], 0)
        return softmax(h @ self._w["W2"] + self._w["b2"])

    def _grads(self, x: npt.NDArray[np.float32], y: npt.NDArray[np.int64]) -> tuple[float, Tensors]:
        w = self._w
        h = np.maximum(x @ w["W1"] + w["b1"], 0)
        p = softmax(h @ w["W2"] + w["b2"])
        n = len(y)
        loss = float(-np.mean(np.log(np.clip(p[np.arange(n), y], 1e-12, 1.0))))
        p[np.arange(n), y] -= 1.0
        p /= np.float32(n)
        dh = (p @ w["W2"].T) * (h > 0)
        return loss, {"W2": h.T @ p, "b2": p.sum(axis=0), "W1": x.T @ dh, "b1": dh.sum(axis=0)}
