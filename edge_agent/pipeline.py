"""The agent's release pipeline: train -> clip -> noise -> encode, composed of wrappers.

Training code knows nothing of privacy. A :class:`Release` (the raw delta) passes through
a list of steps; each step is a callable ``Release -> Release``. Privacy is two steps,
:class:`ClipStep` and :class:`GaussianNoiseStep`; :func:`build_pipeline` composes them from
the config. The noise step consults the accountant *before* it releases, so a release that
would exceed the budget never happens (:class:`BudgetExhausted`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_agent.privacy import PrivacyAccountant, add_gaussian_noise, clip_l2
from fedmq.compression import METHODS, WireTensor, compress, dense
from fedmq.config import PrivacyConfig

Tensors = dict[str, npt.NDArray[Any]]


class BudgetExhausted(Exception):
    """Releasing one more update would exceed the configured epsilon budget."""

    def __init__(self, epsilon_now: float, epsilon_next: float, budget: float) -> None:
        super().__init__(
            f"privacy budget exhausted: epsilon {epsilon_now:.3g} now, {epsilon_next:.3g} after "
            f"one more release > budget {budget:.3g}; no more updates are published"
        )
        self.epsilon_now = epsilon_now
        self.epsilon_next = epsilon_next
        self.budget = budget


@dataclass(frozen=True)
class Release:
    """An update on its way out: the delta, and what the steps learned about it."""

    delta: Tensors
    num_examples: int
    loss: float
    norm: float | None = None
    clipped_to: float | None = None
    epsilon: float | None = None
    wire: Mapping[str, WireTensor] | None = None
    """The delta as it will be sent, when a :class:`CompressStep` compressed it; ``delta`` is
    then what the aggregator will reconstruct from it."""


Step = Callable[[Release], Release]


@dataclass(frozen=True)
class ClipStep:
    """Clip the delta to L2 norm ``bound``."""

    bound: float

    def __call__(self, release: Release) -> Release:
        """Clip; records the pre-clip norm and the bound the delta now satisfies."""
        clipped, norm = clip_l2(release.delta, self.bound)
        return replace(release, delta=clipped, norm=norm, clipped_to=self.bound)


class GaussianNoiseStep:
    """Add ``N(0, (z * bound)^2)`` noise and record the release in the accountant.

    Must follow a :class:`ClipStep` with the same ``bound`` (the sensitivity).
    """

    def __init__(
        self,
        noise_multiplier: float,
        bound: float,
        rng: np.random.Generator,
        accountant: PrivacyAccountant,
        budget: float | None = None,
    ) -> None:
        if noise_multiplier < 0 or bound <= 0:
            raise ValueError("need noise_multiplier >= 0 and bound > 0")
        self.noise_multiplier = noise_multiplier
        self.bound = bound
        self.rng = rng
        self.accountant = accountant
        self.budget = budget

    def check_budget(self) -> None:
        """Raise :class:`BudgetExhausted` if one more release would exceed the budget."""
        if self.budget is None:
            return
        nxt = self.accountant.epsilon(extra=(self.noise_multiplier, 1))
        if nxt > self.budget:
            raise BudgetExhausted(self.accountant.epsilon(), nxt, self.budget)

    def __call__(self, release: Release) -> Release:
        """Check the budget, add noise, account the release."""
        if release.clipped_to is None or release.clipped_to > self.bound:
            raise ValueError("the noise step needs a delta clipped to its bound (put a ClipStep first)")
        self.check_budget()
        noisy = add_gaussian_noise(release.delta, self.noise_multiplier * self.bound, self.rng)
        self.accountant.record(self.noise_multiplier)
        return replace(release, delta=noisy, epsilon=self.accountant.epsilon())


class CompressStep:
    """Compress the delta for the wire, with error feedback; the last step of a pipeline.

    With error feedback (Stich et al., "Sparsified SGD with Memory", NeurIPS 2018; Karimireddy
    et al., ICML 2019), what compression dropped from one release is added to the next one
    before compressing, so no part of the update is lost for good, only delayed. The residual
    is computed from the released (already noised) delta, so under DP it is post-processing
    and costs no privacy. It lives in memory: a restarted agent starts with none.
    """

    def __init__(self, method: str, *, topk_fraction: float = 0.01, error_feedback: bool = True) -> None:
        if method not in METHODS or method == "none":
            raise ValueError(f"compression must be one of {METHODS[1:]}, got {method!r}")
        self.method = method
        self.topk_fraction = topk_fraction
        self.error_feedback = error_feedback
        self.residual: Tensors | None = None

    def __call__(self, release: Release) -> Release:
        """Compress ``release.delta`` (plus the residual); ``delta`` becomes what the server will see."""
        delta = release.delta
        if self.residual is not None and self.residual.keys() == delta.keys():
            delta = {k: v + self.residual[k] for k, v in delta.items()}
        wire = {k: compress(self.method, v, topk_fraction=self.topk_fraction) for k, v in delta.items()}
        seen = {k: dense(w).astype(delta[k].dtype, copy=False) for k, w in wire.items()}
        if self.error_feedback:
            self.residual = {k: delta[k] - seen[k] for k in delta}
        return replace(release, delta=seen, wire=wire, norm=None)


def run_pipeline(steps: Sequence[Step], release: Release) -> Release:
    """Apply ``steps`` in order."""
    for step in steps:
        release = step(release)
    return release


def build_pipeline(
    privacy: PrivacyConfig,
    rng: np.random.Generator,
    accountant: PrivacyAccountant | None,
    *,
    compression: str = "none",
    topk_fraction: float = 0.01,
) -> list[Step]:
    """The steps for a config: clip then noise when DP is on, then compression if configured."""
    tail: list[Step] = [] if compression == "none" else [CompressStep(compression, topk_fraction=topk_fraction)]
    if not privacy.enabled:
        return tail
    if accountant is None:
        raise ValueError("differential privacy needs an accountant")
    return [
        ClipStep(privacy.clip_norm),
        GaussianNoiseStep(privacy.noise_multiplier, privacy.clip_norm, rng, accountant, privacy.epsilon_budget),
        *tail,
    ]
