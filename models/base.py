"""The interface every model backend implements, and helpers over named tensors."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

Tensors = dict[str, npt.NDArray[Any]]


class TrainingCancelled(Exception):
    """``fit`` stopped early because its ``stop`` callback said so (the round is abandoned)."""


@dataclass(frozen=True)
class TrainResult:
    """What local training reports: examples seen per epoch and the mean loss of the last epoch."""

    num_examples: int
    loss: float


class Model(Protocol):
    """A trainable classifier whose parameters are named float32 tensors."""

    name: str

    def get_weights(self) -> Tensors:
        """Return a copy of the parameters."""
        ...

    def set_weights(self, weights: Mapping[str, npt.NDArray[Any]]) -> None:
        """Replace the parameters (names and shapes must match)."""
        ...

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
        """Train with minibatch SGD on cross-entropy.

        ``stop`` is asked between minibatches; when it returns True, :class:`TrainingCancelled`
        is raised and the weights are left half-trained (the caller discards them).
        """
        ...

    def predict_proba(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Class probabilities, shape ``(n, num_classes)``."""
        ...


def evaluate(model: Model, x: npt.NDArray[np.float32], y: npt.NDArray[np.int64]) -> tuple[float, float]:
    """Return ``(mean cross-entropy, accuracy)`` of ``model`` on ``(x, y)``."""
    p = model.predict_proba(x)
    loss = float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-12, 1.0))))
    return loss, float(np.mean(np.argmax(p, axis=1) == y))


def check_compatible(expected: Mapping[str, npt.NDArray[Any]], given: Mapping[str, npt.NDArray[Any]]) -> None:
    """Raise ValueError unless ``given`` has exactly the names, shapes and dtypes of ``expected``."""
    if expected.keys() != given.keys():
        raise ValueError(f"tensor names differ: expected {sorted(expected)}, got {sorted(given)}")
    for k, ref in expected.items():
        g = given[k]
        if g.shape != ref.shape or g.dtype != ref.dtype:
            raise ValueError(f"tensor {k!r}: expected {ref.dtype}{list(ref.shape)}, got {g.dtype}{list(g.shape)}")


def flatten(tensors: Mapping[str, npt.NDArray[Any]]) -> npt.NDArray[np.float32]:
    """Concatenate named tensors, in sorted-name order, into one float32 vector."""
    if not tensors:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate([np.asarray(tensors[k], dtype=np.float32).reshape(-1) for k in sorted(tensors)])


def unflatten(vector: npt.NDArray[Any], like: Mapping[str, npt.NDArray[Any]]) -> Tensors:
    """Inverse of :func:`flatten`: split ``vector`` into tensors shaped like ``like``."""
    out: Tensors = {}
    offset = 0
    for k in sorted(like):
        ref = like[k]
        out[k] = np.asarray(vector[offset : offset + ref.size], dtype=ref.dtype).reshape(ref.shape)
        offset += ref.size
    if offset != vector.size:
        raise ValueError(f"vector has {vector.size} values, tensors need {offset}")
    return out


def softmax(z: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Row-wise softmax, stable against overflow."""
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)  # type: ignore[no-any-return]
