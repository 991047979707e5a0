"""The aggregator's privacy: central DP as a wrapper around the sum, and the federation's ledger.

Two mechanisms release a sum in which each contributor is protected at the aggregator:

- **central DP** (:class:`CentralGaussian`, trusting the server): the aggregator clips, sums and
  adds Gaussian noise (:func:`aggregator.rules.central_dp.noised_mean`);
- **distributed DP** under secure aggregation: the devices add the noise
  (:mod:`fedmq.secagg.ddg_noise`) and the aggregator only learns the noised sum.

Either way the aggregator knows who was in each released sum and with which parameters, so it
keeps a :class:`FederationLedger` (one release per contribution, composed without sampling
amplification) and reports the federation's epsilon: the largest over devices. Each device keeps
its own ledger too and refuses to release past its budget; this one is the operator's view.
The ledger is plain data, checkpointed with the aggregator's state.
"""

from __future__ import annotations

import functools
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from aggregator.rules.central_dp import noised_mean
from fedmq.errors import RejectReason
from fedmq.secagg.ddp import ORDERS, DdgParams, rdp
from fedmq.secagg.ddp import epsilon as rdp_epsilon

Tensors = dict[str, npt.NDArray[Any]]
Deltas = Sequence[Mapping[str, npt.NDArray[Any]]]


class CentralGaussian:
    """Central DP around the buffer's sum: clip to ``clip``, weight by staleness, add ``N(0, (z clip)^2)``, / K.

    Composes like the robust aggregates (:mod:`aggregator.robust`). Weights are staleness
    weights only (``trusts_claims = False``): an example count is a device's claim and would
    break the sensitivity bound.

    **The noise of sum number i is a function of a secret key and i**, both in the aggregator's
    checkpoint (:meth:`state_dict`). After a crash the aggregator replays its log through the
    rule; fresh noise would then publish a second, independently noised copy of sums already
    published, and averaging the two halves the noise the ledger charged for. With the key, a
    replay reproduces the same noise, so each sum is released once. The key is 32 bytes from the
    OS (or given, for tests); the stream per sum is numpy's PCG64 seeded by ``(key, i)``.
    """

    name = "central_dp"
    trusts_claims = False

    def __init__(self, clip: float, noise_multiplier: float, key: bytes | None = None) -> None:
        if not (math.isfinite(clip) and clip > 0) or not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
            raise ValueError(f"central DP needs clip > 0 and noise_multiplier > 0, got {clip}, {noise_multiplier}")
        self.clip = clip
        self.noise_multiplier = noise_multiplier
        self.key = key if key is not None else os.urandom(32)
        if len(self.key) != 32:
            raise ValueError(f"the noise key must be 32 bytes, got {len(self.key)}")
        self.sums = 0
        """Sums noised so far: the index of the next sum's noise."""
        self.counters: Counter[str] = Counter()

    def __call__(self, deltas: Deltas, weights: Sequence[float]) -> Tensors:
        """The noised mean of the clipped, staleness-weighted deltas."""
        seed = np.random.SeedSequence(int.from_bytes(self.key, "big"), spawn_key=(self.sums,))
        rng = np.random.Generator(np.random.PCG64(seed))
        out = noised_mean(deltas, weights, clip=self.clip, stddev=self.noise_multiplier * self.clip, rng=rng)
        self.sums += 1
        self.counters["noised_sums"] += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        """The key and the sum counter (the checkpoint keeps them: replays reproduce the noise)."""
        return {"key": self.key, "sums": self.sums}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        key = bytes(state["key"])
        if len(key) != 32:
            raise ValueError("the central DP noise key in the checkpoint is not 32 bytes")
        self.key, self.sums = key, int(state["sums"])


Release = tuple[str, float] | DdgParams
"""One release's parameters: ``("gaussian", z)`` for central DP, :class:`DdgParams` for distributed DP."""


@functools.lru_cache(maxsize=4096)
def history_epsilon(history: tuple[tuple[Release, int], ...], delta: float) -> float:
    """Epsilon at ``delta`` of one device's releases, without sampling amplification.

    Gaussian releases compose in dp-accounting's RDP accountant, distributed discrete Gaussian
    ones through :mod:`fedmq.secagg.ddp`; a device with both gets the sum of the two epsilons
    (basic composition, an upper bound). Cached: most devices share a history.
    """
    eps = 0.0
    gaussian = [(r[1], n) for r, n in history if isinstance(r, tuple)]
    if gaussian:
        import dp_accounting
        from dp_accounting import rdp as dp_rdp

        acc = dp_rdp.RdpAccountant()
        for z, n in gaussian:
            acc.compose(dp_accounting.GaussianDpEvent(z), n)
        eps += float(acc.get_epsilon(delta))
    ddg = [(r, n) for r, n in history if isinstance(r, DdgParams)]
    if ddg:
        curve = np.zeros(len(ORDERS))
        for p, n in ddg:
            curve += n * rdp(p)
        eps += rdp_epsilon(curve, delta)
    return eps


class FederationLedger:
    """Every device's releases as the aggregator applied them, and the federation's epsilon.

    Args:
        delta: the delta epsilons are reported at.
    """

    def __init__(self, delta: float) -> None:
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        self.delta = delta
        self.releases: dict[str, Counter[Release]] = {}
        self.last: dict[str, int] = {}
        """The model version each device's last released sum made (for the minimum separation)."""
        self.max_epsilon = 0.0
        """The largest epsilon of any device so far (0 before any release)."""

    def record(self, agents: Sequence[str], release: Release, version: int = 0) -> None:
        """One release (a noised sum, making model ``version``) that included ``agents``."""
        for a in agents:
            self.releases.setdefault(a, Counter())[release] += 1
            self.last[a] = version
            self.max_epsilon = max(self.max_epsilon, self.epsilon(a))

    def refusal(
        self, agent: str, *, version: int, max_participation: int, min_separation: int, pending: int = 0
    ) -> tuple[RejectReason, str] | None:
        """Why ``agent`` may not join another release now, if so (the aggregator and the sites ask this).

        ``participation_cap``: it is in ``max_participation`` releases already, counting
        ``pending`` updates not yet released (final; 0: no cap). ``participation_window``: its
        last release made a version fewer than ``min_separation`` before ``version``, or it has
        one pending (retry later; 0: no separation).
        """
        if max_participation and self.count(agent) + pending >= max_participation:
            return RejectReason.PARTICIPATION_CAP, f"already in {max_participation} released sums"
        last = self.last.get(agent)
        if min_separation and (pending or (last is not None and version - last < min_separation)):
            why = "has an update waiting" if pending else f"was in the sum that made version {last}"
            return RejectReason.PARTICIPATION_WINDOW, f"{why}; sums are {min_separation} versions apart"
        return None

    def count(self, agent: str) -> int:
        """Releases that included ``agent``."""
        history = self.releases.get(agent)
        return sum(history.values()) if history else 0

    def epsilon(self, agent: str) -> float:
        """The device's epsilon at :attr:`delta` (0 if it was in no release)."""
        history = self.releases.get(agent)
        if not history:
            return 0.0
        return history_epsilon(tuple(sorted(history.items(), key=repr)), self.delta)

    def state_dict(self) -> dict[str, Any]:
        """Plain data for the checkpoint."""
        return {
            "delta": self.delta,
            "releases": {
                a: [[_release_to_state(r), n] for r, n in sorted(h.items(), key=repr)] for a, h in self.releases.items()
            },
            "last": dict(self.last),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (ValueError on a malformed entry)."""
        self.releases = {
            str(a): Counter({_release_from_state(r): int(n) for r, n in entries})
            for a, entries in dict(state["releases"]).items()
        }
        self.last = {str(a): int(v) for a, v in dict(state.get("last", {})).items()}
        self.max_epsilon = max((self.epsilon(a) for a in self.releases), default=0.0)


def _release_to_state(r: Release) -> dict[str, Any]:
    if isinstance(r, DdgParams):
        return {"ddg": dict(r.__dict__)}
    return {"gaussian": r[1]}


def _release_from_state(obj: Mapping[str, Any]) -> Release:
    if "ddg" in obj:
        return DdgParams(**{k: v for k, v in dict(obj["ddg"]).items()})
    z = float(obj["gaussian"])
    if not (math.isfinite(z) and z > 0):
        raise ValueError(f"a Gaussian release needs z > 0, got {z}")
    return ("gaussian", z)


def calibrate_gaussian(target_epsilon: float, delta: float, releases: int) -> float:
    """The smallest noise multiplier ``z`` whose ``releases`` Gaussian releases stay within ``target_epsilon``.

    Solved by dp-accounting's ``calibrate_dp_mechanism`` with its RDP accountant (no sampling
    amplification). Central DP and local DP charge the same ``z`` per release: the sensitivity
    is the clip either way.
    """
    if not (math.isfinite(target_epsilon) and target_epsilon > 0) or releases < 1 or not 0 < delta < 1:
        raise ValueError(f"need epsilon > 0, releases >= 1, 0 < delta < 1, got {target_epsilon}, {releases}, {delta}")
    import dp_accounting
    from dp_accounting import rdp as dp_rdp

    def event(z: float) -> Any:
        return dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), releases)

    return float(
        dp_accounting.calibrate_dp_mechanism(
            dp_rdp.RdpAccountant, event, target_epsilon, delta, dp_accounting.LowerEndpointAndGuess(1e-3, 1.0)
        )
    )
