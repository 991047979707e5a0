"""Byzantine agents for the simulator: attacks as release-pipeline steps (and one data poisoning).

A compromised device runs our agent but changes what it releases. Each attack rewrites the
agent's pipeline (``LocalTrainer.steps``) or its data, never the training code:

- ``sign_flip``: send ``-4 x`` the trained delta, skipping clip and noise (the "sign
  flipping" Byzantine gradient of e.g. Li et al., RSA, AAAI 2019, scaled as is common).
- ``scale``: model replacement (Bagdasaryan et al., "How To Backdoor Federated Learning",
  AISTATS 2020): train on flipped labels to a poisoned model ``L`` and send
  ``boost * (L - G)`` with ``boost = K / eta`` (FedBuff buffer over server learning rate),
  so that one update replaces the global model ``G`` under plain averaging.
- ``gaussian``: send ``N(0, 5^2)`` per coordinate instead of an update.
- ``label_flip``: train on labels ``y -> C - 1 - y`` and release through the honest
  pipeline (clip, noise): a poisoned device that looks honest.
- ``alie``: "A Little Is Enough" (Baruch, Baruch, Goldberg, NeurIPS 2019): colluding agents
  pool their honestly released deltas, estimate the per-coordinate mean and standard
  deviation, and each sends ``mean - z_max * std`` with ``z_max`` from the paper, so every
  coordinate stays inside the benign spread while all of them push the same way.
- ``window``: skip the noise, send ``-delta`` scaled to ``sqrt(d) * s``, the norm an honestly
  noised update has (``s`` the agreed noise std): the DP norm window alone cannot tell it apart.
- ``inflate``: train on flipped labels, release through the honest pipeline (clip, noise) and
  claim ``2^62`` examples, so that weighting by the claim makes it outweigh everyone.
- ``fast``: send ``-4 x`` the trained delta (as ``sign_flip``) 20 times as often as an honest
  device (a twentieth of its compute time), to fill the buffers.

With ``conform`` (the federation uses local DP and the aggregator checks it, see
:func:`aggregator.rules.noise.NoiseCheck`), the sign-flip, scaling and Gaussian attackers
disguise themselves: they scale their malicious delta down to the largest signal the norm
window lets through (``0.7 * sqrt(high^2 - d s^2)``) and add the agreed noise themselves.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from statistics import NormalDist
from typing import Any

import numpy as np
import numpy.typing as npt

from aggregator.rules.noise import dp_norm_window  # the check a conforming attacker must pass
from edge_agent.pipeline import Release, Step
from models.datasets import Dataset

Tensors = dict[str, npt.NDArray[Any]]
ATTACKS = ("none", "sign_flip", "scale", "gaussian", "label_flip", "alie", "window", "inflate", "fast")
SIGN_FLIP_SCALE = 4.0
GAUSSIAN_SIGMA = 5.0
INFLATED_EXAMPLES = 2**62
FAST_SPEEDUP = 20.0


def flip_labels(data: Dataset, num_classes: int) -> Dataset:
    """``y -> num_classes - 1 - y``: every example labelled as some other class."""
    return Dataset(data.x, (num_classes - 1 - data.y).astype(data.y.dtype))


@dataclass
class Collusion:
    """The colluders' shared view for ALIE: each one's latest honestly released delta."""

    n_agents: int
    n_malicious: int
    latest: dict[int, Tensors] = field(default_factory=dict)

    @property
    def z_max(self) -> float:
        """Baruch et al. (Sec. 3): ``s = floor(n/2 + 1) - f``, ``z_max = Phi^-1((n - s) / n)``."""
        n, f = self.n_agents, self.n_malicious
        s = math.floor(n / 2 + 1) - f
        return NormalDist().inv_cdf(min(max((n - s) / n, 1e-6), 1 - 1e-6))

    def craft(self, who: int, honest: Tensors) -> Tensors:
        """Record ``who``'s honest delta and return the ALIE delta from all colluders' latest."""
        self.latest[who] = honest
        pool = list(self.latest.values())
        z = self.z_max
        out: Tensors = {}
        for k, ref in honest.items():
            stack = np.stack([p[k] for p in pool])
            mean, std = stack.mean(axis=0), stack.std(axis=0)
            out[k] = (mean - ref.dtype.type(z) * std).astype(ref.dtype, copy=False)
        return out


@dataclass(frozen=True)
class Disguise:
    """How a conforming attacker passes the aggregator's DP norm check: signal budget and noise."""

    max_signal: float
    noise_std: float

    def apply(self, delta: Tensors, rng: np.random.Generator) -> Tensors:
        """Scale ``delta`` to at most ``max_signal`` (global L2), then add ``N(0, noise_std^2)``."""
        norm = math.sqrt(sum(float(np.dot(v.ravel(), v.ravel())) for v in delta.values()))
        scale = min(1.0, self.max_signal / norm) if norm > 0 else 1.0
        return {
            k: (v * v.dtype.type(scale) + rng.normal(0.0, self.noise_std, v.shape).astype(v.dtype))
            for k, v in delta.items()
        }


@dataclass(frozen=True)
class AttackPlan:
    """Which agents are malicious and how they attack."""

    attack: str
    malicious: frozenset[int]
    num_classes: int
    boost: float
    collusion: Collusion | None
    disguise: Disguise | None = None
    window_norm: float = 1.0
    """``window``: the L2 norm to send at (``sqrt(d) * s`` for the agreed noise std ``s``)."""

    @property
    def speedup(self) -> float:
        """How much faster than honest the malicious agents send (``fast``; 1 otherwise)."""
        return FAST_SPEEDUP if self.attack == "fast" else 1.0

    def data_for(self, agent: int, data: Dataset) -> Dataset:
        """The agent's training data (poisoned for label-flipping and model-replacement attackers)."""
        if agent in self.malicious and self.attack in ("label_flip", "scale", "inflate"):
            return flip_labels(data, self.num_classes)
        return data

    def steps_for(self, agent: int, honest: Sequence[Step], rng: np.random.Generator) -> list[Step]:
        """The release pipeline of ``agent``: the honest one unless it is malicious."""
        if agent not in self.malicious or self.attack in ("none", "label_flip"):
            return list(honest)
        if self.attack == "inflate":
            return [*honest, _claim(INFLATED_EXAMPLES)]
        if self.attack == "window":
            return [_map_delta(lambda d: _scaled_to(d, -self.window_norm))]  # no clip, no noise
        steps: list[Step]
        if self.attack in ("sign_flip", "fast"):
            steps = [_map_delta(lambda d: {k: v * v.dtype.type(-SIGN_FLIP_SCALE) for k, v in d.items()})]
        elif self.attack == "scale":
            boost = self.boost
            steps = [_map_delta(lambda d: {k: v * v.dtype.type(boost) for k, v in d.items()})]
        elif self.attack == "gaussian":
            steps = [
                _map_delta(
                    lambda d: {k: rng.normal(0.0, GAUSSIAN_SIGMA, v.shape).astype(v.dtype) for k, v in d.items()}
                )
            ]
        else:
            steps = []
        if steps:
            if self.disguise is not None:
                disguise = self.disguise
                steps.append(_map_delta(lambda d: disguise.apply(d, rng)))
            return steps
        if self.attack == "alie":
            assert self.collusion is not None
            collusion = self.collusion
            return [*honest, _map_delta(lambda d: collusion.craft(agent, d))]
        raise ValueError(f"unknown attack {self.attack!r}")


def _scaled_to(delta: Tensors, norm: float) -> Tensors:
    """``delta`` scaled to L2 norm ``|norm|`` (sign-flipped when ``norm < 0``); zero stays zero."""
    have = math.sqrt(sum(float(np.dot(v.ravel(), v.ravel())) for v in delta.values()))
    factor = norm / have if have > 0 else 0.0
    return {k: (v * v.dtype.type(factor)).astype(v.dtype, copy=False) for k, v in delta.items()}


def _claim(num_examples: int) -> Step:
    def step(release: Release) -> Release:
        return replace(release, num_examples=num_examples)

    return step


def _map_delta(fn: Callable[[Tensors], Tensors]) -> Step:
    def step(release: Release) -> Release:
        return replace(release, delta=fn(release.delta), norm=None, clipped_to=None, epsilon=None)

    return step


def plan_attack(
    attack: str,
    malicious_fraction: float,
    n_agents: int,
    *,
    num_classes: int,
    buffer_size: int,
    server_lr: float,
    seed: int,
    conform_to: tuple[int, float, float] | None = None,
    window_norm: float = 1.0,
) -> AttackPlan:
    """Choose ``round(f * n)`` malicious agents (by seed) for ``attack``.

    ``conform_to = (dim, noise_std, clip_norm)`` makes the attackers disguise their updates to
    pass the aggregator's DP norm check (see :class:`Disguise`). ``window_norm`` is the norm the
    ``window`` attacker sends at.
    """
    if attack not in ATTACKS:
        raise ValueError(f"attack must be one of {', '.join(ATTACKS)}, got {attack!r}")
    if not 0 <= malicious_fraction < 1:
        raise ValueError(f"malicious fraction must be in [0, 1), got {malicious_fraction}")
    count = round(malicious_fraction * n_agents) if attack != "none" else 0
    chosen = np.random.default_rng([seed, 1789]).choice(n_agents, size=count, replace=False)
    return AttackPlan(
        attack=attack,
        malicious=frozenset(int(i) for i in chosen),
        num_classes=num_classes,
        boost=buffer_size / server_lr,
        collusion=Collusion(n_agents, count) if attack == "alie" and count else None,
        disguise=_disguise(*conform_to) if conform_to is not None and attack not in ("window", "inflate") else None,
        window_norm=window_norm,
    )


def _disguise(dim: int, noise_std: float, clip_norm: float) -> Disguise:
    _, high = dp_norm_window(dim, noise_std, clip_norm)
    return Disguise(0.7 * math.sqrt(max(high * high - dim * noise_std * noise_std, 0.0)), noise_std)
