"""Update-level differential privacy: the Gaussian mechanism and a separate accountant.

Mechanism (DP-FedAvg, McMahan et al., "Learning Differentially Private Recurrent Language
Models", ICLR 2018): clip the update to L2 norm ``C`` and add ``N(0, (z C)^2)`` noise to
every coordinate. Each agent applies it to its own update before it leaves the device
(local DP), so the privacy loss composes over that agent's releases.

Accountant: Rényi DP via Google's ``dp-accounting`` (Mironov 2017), neighbouring relation
add/remove of one device's whole contribution. It is separate from the mechanism, and
its state is the list of releases (plain data), so it is checkpointed and restored exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from fedmq.rdp import rdp_accountant

__all__ = ["PrivacyAccountant", "add_gaussian_noise", "clip_l2", "l2_norm", "rdp_accountant"]

Tensors = dict[str, npt.NDArray[Any]]


def l2_norm(tensors: Mapping[str, npt.NDArray[Any]]) -> float:
    """Global L2 norm over all tensors (accumulated in float64 for accuracy).

    Summed with numpy's pairwise sum, not BLAS ``dot``. Agents train in worker threads, and
    concurrent OpenBLAS calls on vectors this long contend for its lock: with 100 simulated
    agents of the 26K-parameter speech model, ``dot`` was 12 times slower than serial and stalled
    the federation.
    """
    total = 0.0
    for t in tensors.values():
        flat = t.reshape(-1).astype(np.float64)
        total += float(np.sum(flat * flat))
    return math.sqrt(total)


def clip_l2(tensors: Mapping[str, npt.NDArray[Any]], bound: float) -> tuple[Tensors, float]:
    """Scale ``tensors`` so that their global L2 norm is at most ``bound``.

    Returns ``(clipped, original_norm)``. A zero update is returned unchanged (no division
    by a zero norm); a non-finite norm is an error, never silently turned into NaN.
    """
    if not (math.isfinite(bound) and bound > 0):
        raise ValueError(f"clip bound must be finite and > 0, got {bound}")
    norm = l2_norm(tensors)
    if not math.isfinite(norm):
        raise ValueError("update contains NaN or Inf; refusing to clip it")
    if norm <= bound:
        return {k: np.array(v) for k, v in tensors.items()}, norm
    factor = bound / norm
    return {k: (v * v.dtype.type(factor)) for k, v in tensors.items()}, norm


def add_gaussian_noise(tensors: Mapping[str, npt.NDArray[Any]], std: float, rng: np.random.Generator) -> Tensors:
    """Add i.i.d. ``N(0, std^2)`` to every coordinate, in each tensor's dtype. ``rng`` is injected."""
    if not (math.isfinite(std) and std >= 0):
        raise ValueError(f"noise std must be finite and >= 0, got {std}")
    if std == 0:
        return {k: np.array(v) for k, v in tensors.items()}
    return {k: v + rng.normal(0.0, std, size=v.shape).astype(v.dtype) for k, v in tensors.items()}


class PrivacyAccountant:
    """RDP accountant over this agent's Gaussian releases (``dp_accounting.rdp.RdpAccountant``).

    State is the release history ``[(noise_multiplier, count), ...]``; :meth:`state_dict`
    and :meth:`load_state_dict` make it checkpointable, and the epsilon is always recomputed
    from the history by the library (no hand-written RDP formulas).
    """

    def __init__(self, delta: float) -> None:
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        self.delta = delta
        self.history: list[tuple[float, int]] = []

    def record(self, noise_multiplier: float, count: int = 1) -> None:
        """Compose ``count`` releases of the Gaussian mechanism with ``noise_multiplier``."""
        if noise_multiplier < 0 or count < 1:
            raise ValueError("noise_multiplier must be >= 0 and count >= 1")
        if self.history and self.history[-1][0] == noise_multiplier:
            self.history[-1] = (noise_multiplier, self.history[-1][1] + count)
        else:
            self.history.append((noise_multiplier, count))

    @property
    def releases(self) -> int:
        """Number of releases so far."""
        return sum(c for _, c in self.history)

    def epsilon(self, extra: tuple[float, int] | None = None) -> float:
        """Epsilon at :attr:`delta` after the history (plus ``extra`` releases, for a what-if)."""
        entries = [*self.history, *([extra] if extra else [])]
        if not entries:
            return 0.0
        if any(z == 0 for z, _ in entries):
            return math.inf
        accountant_cls, gaussian_event = rdp_accountant()
        acc = accountant_cls()
        for z, count in entries:
            acc.compose(gaussian_event(z), count)
        return float(acc.get_epsilon(self.delta))

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state (for the agent's state file)."""
        return {"delta": self.delta, "history": [[z, c] for z, c in self.history]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; the delta must match the configured one."""
        if float(state["delta"]) != self.delta:
            raise ValueError(f"accountant state is for delta {state['delta']}, configured {self.delta}")
        self.history = [(float(z), int(c)) for z, c in state["history"]]
