"""Privacy against utility at population scale: thousands of devices that really train, in virtual time.

A researcher's question, answered on one machine in minutes: with N devices, a participation
cap and a target epsilon, what accuracy does each privacy mechanism leave? Every device trains
its numpy model on its own data; the federation's arithmetic is the product's own code:

- **none**: FedBuff's weighted mean (:class:`aggregator.core.FedBuffRule`), no clipping;
- **local**: each device clips and adds Gaussian noise (:mod:`edge_agent.privacy`, DP-FedAvg as
  ``fedmq agent`` runs it), and FedBuff averages;
- **central**: the aggregator clips, sums and noises (:class:`aggregator.privacy.CentralGaussian`),
  trusting the server;
- **distributed**: each device clips, weights, rounds and adds its share of discrete Gaussian
  noise (:func:`fedmq.secagg.ddg_noise.encode`, the secure-aggregation client's own step), the
  integers are summed mod ``2^bits``, and the aggregator decodes the sum (:func:`ddg_noise.decode`).

What is left out is what cannot change the numbers: MQTT, and the pairwise and self masks, which
cancel exactly in the ring (``tests/test_secagg_protocol.py`` checks the sum to the bit). The
broker-level tests run the same mechanism through the real protocol.

Asynchrony is simulated in virtual time: ``concurrency`` devices train at once, each for a
log-normal compute time scaled by its own speed (a tenth of them five times slower); an update's
staleness is the number of server steps taken while it trained. A device contributes at most
``releases`` times (the participation cap) and never while it has an update in flight. Noise is
calibrated so that ``releases`` releases cost ``epsilon`` at ``delta``, with no sampling
amplification (participation is not Poisson sampling); the reported epsilon is each device's
ledger over the sums it was actually in, so it is at most the target.

The seed fixes the schedule, the initial model, the training and local DP's noise (the agent's
injected generator). Central and distributed DP draw their noise as the product does, from fresh
OS randomness (the aggregator's key, the devices' AES-CTR streams), so those rows vary from run
to run by their noise even at one seed.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from aggregator.core import FedBuffRule
from aggregator.privacy import CentralGaussian, calibrate_gaussian, history_epsilon
from aggregator.robust import Aggregate
from edge_agent.privacy import add_gaussian_noise, clip_l2
from fedmq.secagg import ddg_noise, ddp
from fedmq.secagg.client import weighted_input
from fedmq.secagg.messages import Params
from fedmq.secagg.quantize import ring_dtype
from fedmq.staleness import make_staleness_fn
from models import create_model
from models.base import evaluate, unflatten
from models.datasets import Dataset

MECHANISMS = ("none", "local", "central", "distributed")
Tensors = dict[str, npt.NDArray[Any]]


@dataclass(frozen=True)
class PopulationConfig:
    """One run: a fleet, a mechanism, a privacy target and the federation's settings."""

    mechanism: str = "none"
    epsilon: float = 8.0
    """Target epsilon of each device over ``releases`` releases (ignored for ``none``)."""
    delta: float = 1e-5
    releases: int = 10
    """Participation cap: the most sums a device's update is in."""
    buffer: int = 100
    """K: updates per server step (a secure-aggregation cohort's uploads)."""
    survivors: int = 80
    """t: distributed noise is calibrated so that any t uploads carry the target noise."""
    overselect: float = 0.2
    """Cohorts have ``ceil(K (1 + rho))`` members; their sum must fit the ring."""
    concurrency: int = 200
    clip: float = 2.0
    model: str = "mlp"
    """The numpy model every device trains (``mlp`` or ``softmax``)."""
    hidden: int = 32
    local_epochs: int = 10
    """Local work per release: under DP a release costs budget, a local step does not."""
    batch_size: int = 16
    lr: float = 0.2
    server_lr: float = 2.0
    momentum: float = 0.0
    staleness: str = "constant"
    staleness_a: float = 0.5
    max_staleness: int = 10
    bits: int = 32
    speed_sigma: float = 0.5
    slow_fraction: float = 0.1
    slow_factor: float = 5.0
    eval_every: int = 5
    seed: int = 0

    def validate(self) -> PopulationConfig:
        """Raise ValueError naming the first field out of range."""
        checks = [
            (self.mechanism in MECHANISMS, "mechanism", f"one of {MECHANISMS}"),
            (self.epsilon > 0 and math.isfinite(self.epsilon), "epsilon", "> 0"),
            (0 < self.delta < 1, "delta", "in (0, 1)"),
            (self.releases >= 1, "releases", ">= 1"),
            (self.buffer >= 2, "buffer", ">= 2"),
            (2 <= self.survivors <= self.buffer, "survivors", "in [2, buffer]"),
            (self.concurrency >= self.buffer, "concurrency", ">= buffer (else no buffer ever fills)"),
            (self.clip > 0, "clip", "> 0"),
            (self.model in ("mlp", "softmax"), "model", "mlp or softmax (numpy)"),
            (self.eval_every >= 1, "eval_every", ">= 1"),
        ]
        for ok, name, want in checks:
            if not ok:
                raise ValueError(f"population.{name} must be {want}, got {getattr(self, name)!r}")
        return self

    @property
    def members(self) -> int:
        """Devices in a cohort, ``ceil(K (1 + rho))``: the summands the ring must hold."""
        return math.ceil(self.buffer * (1 + self.overselect) - 1e-9)


@dataclass
class PopulationResult:
    """What a run measured."""

    config: PopulationConfig
    devices: int
    accuracy: float
    """Held-out accuracy of the last model."""
    best_accuracy: float
    curve: list[tuple[int, float]]
    """``(server step, held-out accuracy)`` every ``eval_every`` steps."""
    steps: int
    contributions: int
    dropped_stale: int
    max_epsilon: float
    """The largest epsilon of any device over the sums it was in (0 without DP)."""
    noise: dict[str, float] = field(default_factory=dict)
    """The calibration: noise multiplier (Gaussian) or central standard deviation and step (DDG)."""
    mean_staleness: float = 0.0
    seconds: float = 0.0


class _Mechanism:
    """How updates become a server step: FedBuff's rule around ``aggregate`` (its mean by default)."""

    def __init__(self, cfg: PopulationConfig, rng: np.random.Generator, aggregate: Aggregate | None = None) -> None:
        self.cfg = cfg
        self.rng = rng
        self.staleness_fn = make_staleness_fn(cfg.staleness, cfg.staleness_a)
        self.rule = FedBuffRule(
            cfg.buffer, self.staleness_fn, server_lr=cfg.server_lr, momentum=cfg.momentum, aggregate=aggregate
        )
        self.noise: dict[str, float] = {}
        self.release: ddp.DdgParams | tuple[str, float] | None = None

    def add(self, weights: Tensors, delta: Tensors, staleness: int, examples: int, agent: str) -> Tensors | None:
        return self.rule.add(
            weights, None, delta, staleness=staleness, num_examples=examples, agent_id=agent
        )  # fmt: skip


def _none(cfg: PopulationConfig, like: Tensors, rng: np.random.Generator) -> _Mechanism:
    return _Mechanism(cfg, rng)


def _gaussian_z(cfg: PopulationConfig) -> float:
    """Local and central DP charge the same z per release: the sensitivity is the clip either way."""
    return calibrate_gaussian(cfg.epsilon, cfg.delta, cfg.releases)


class _Local(_Mechanism):
    def __init__(self, cfg: PopulationConfig, like: Tensors, rng: np.random.Generator) -> None:
        super().__init__(cfg, rng)
        self.z = _gaussian_z(cfg)
        self.noise = {"noise_multiplier": self.z}
        self.release = ("gaussian", self.z)

    def add(self, weights: Tensors, delta: Tensors, staleness: int, examples: int, agent: str) -> Tensors | None:
        clipped, _ = clip_l2(delta, self.cfg.clip)
        return super().add(
            weights, add_gaussian_noise(clipped, self.z * self.cfg.clip, self.rng), staleness, examples, agent
        )


class _Central(_Mechanism):
    def __init__(self, cfg: PopulationConfig, like: Tensors, rng: np.random.Generator) -> None:
        z = _gaussian_z(cfg)
        super().__init__(cfg, rng, CentralGaussian(cfg.clip, z))  # a fresh OS key, as the aggregator makes
        self.noise = {"noise_multiplier": z}
        self.release = ("gaussian", z)


class _Distributed(_Mechanism):
    def __init__(self, cfg: PopulationConfig, like: Tensors, rng: np.random.Generator) -> None:
        super().__init__(cfg, rng)
        dim = sum(v.size for v in like.values()) + 1
        calib = ddp.calibrate(
            cfg.epsilon, cfg.delta, releases=cfg.releases, survivors=cfg.survivors, summands=cfg.members,
            dim=dim, clip=ddp.input_clip(cfg.clip), bits=cfg.bits,
        )  # fmt: skip
        # What the aggregator announces; each device and the aggregator derive the release from it.
        announced = Params(
            bits=cfg.bits, clip_norm=cfg.clip, dp_stddev=calib.params.central_stddev, dp_survivors=cfg.survivors
        )
        release = announced.release(threshold=cfg.survivors, members=cfg.members, dim=dim)
        assert release is not None
        self.params = self.release = release
        self.noise = {
            "central_stddev": release.central_stddev,
            "noise_multiplier": calib.noise_multiplier,
            "gamma": release.gamma,
            "sigma_int": release.sigma,
        }
        self.ring = np.zeros(dim, dtype=ring_dtype(cfg.bits))
        self.count = 0

    def add(self, weights: Tensors, delta: Tensors, staleness: int, examples: int, agent: str) -> Tensors | None:
        values = weighted_input(delta, clip_norm=self.cfg.clip, weight=self.staleness_fn(staleness))
        values = ddg_noise.device_input(values, self.cfg.clip)  # as the secure-aggregation client does
        # The device's own default: AES-256-CTR under a fresh OS key (not replayable from the seed).
        self.ring += ddg_noise.encode(values, self.params, self.cfg.bits)  # wraps mod 2^32
        self.count += 1
        if self.count < self.cfg.buffer:
            return None
        total = ddg_noise.decode(self.ring, self.params, self.cfg.bits)
        self.ring[:] = 0
        self.count = 0
        # The weights' sum is noised too: divide by the public count of uploads, not by it.
        mean = unflatten(total[:-1] / self.cfg.buffer, weights)
        return self.rule.step_mean(weights, mean)


_MAKERS: dict[str, Callable[[PopulationConfig, Tensors, np.random.Generator], _Mechanism]] = {
    "none": _none,
    "local": _Local,
    "central": _Central,
    "distributed": _Distributed,
}


def run_population(
    cfg: PopulationConfig,
    data: Sequence[Dataset],
    test: Dataset,
    *,
    progress: Callable[[int, float], None] | None = None,
) -> PopulationResult:
    """Run one federation of ``len(data)`` devices to the end of their participation caps."""
    cfg.validate()
    n = len(data)
    if n < cfg.concurrency:
        cfg = replace(cfg, concurrency=max(cfg.buffer, n))
    if n < cfg.buffer:
        raise ValueError(f"population.buffer: {cfg.buffer} updates per step need at least as many devices, got {n}")
    started = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    num_features = int(test.x.shape[1])
    num_classes = int(max(int(test.y.max()), *(int(d.y.max()) for d in data)) + 1)
    model = create_model(
        cfg.model, num_features=num_features, num_classes=num_classes, hidden=cfg.hidden, seed=cfg.seed
    )
    weights: Tensors = model.get_weights()
    mech = _MAKERS[cfg.mechanism](cfg, weights, np.random.default_rng(rng.integers(1 << 62)))

    speed = np.exp(rng.normal(0.0, cfg.speed_sigma, n))
    speed[rng.random(n) < cfg.slow_fraction] *= cfg.slow_factor
    left = np.full(n, cfg.releases)
    idle = list(range(n))
    in_flight: list[tuple[float, int, int, int]] = []  # (finish time, tie, device, base version)
    snapshots: dict[int, Tensors] = {0: weights}
    pinned: Counter[int] = Counter()
    version, tie, now = 0, 0, 0.0
    included: Counter[int] = Counter()
    pending: list[int] = []
    staleness_sum = contributions = dropped = 0
    curve: list[tuple[int, float]] = []

    def dispatch() -> None:
        nonlocal tie
        while idle and len(in_flight) < cfg.concurrency:
            i = int(rng.integers(len(idle)))
            idle[i], idle[-1] = idle[-1], idle[i]
            device = idle.pop()
            tie += 1
            heapq.heappush(in_flight, (now + speed[device] * math.exp(rng.normal(0.0, 0.3)), tie, device, version))
            pinned[version] += 1

    def score() -> float:
        model.set_weights(weights)
        return evaluate(model, test.x, test.y)[1]

    dispatch()
    while in_flight:
        now, _, device, base = heapq.heappop(in_flight)
        pinned[base] -= 1
        staleness = version - base
        if staleness > cfg.max_staleness:  # the agent drops it before release: nothing charged
            dropped += 1
        else:
            model.set_weights(snapshots[base])
            model.fit(
                data[device].x, data[device].y, epochs=cfg.local_epochs, batch_size=cfg.batch_size, lr=cfg.lr, rng=rng
            )
            trained = model.get_weights()
            delta = {k: trained[k] - snapshots[base][k] for k in trained}
            new = mech.add(weights, delta, staleness, len(data[device]), f"d{device}")
            left[device] -= 1
            contributions += 1
            staleness_sum += staleness
            pending.append(device)
            if new is not None:
                weights = new
                version += 1
                snapshots[version] = weights
                included.update(pending)  # these devices' updates are in a released sum
                pending.clear()
                if version % cfg.eval_every == 0:
                    curve.append((version, score()))
                    if progress is not None:
                        progress(version, curve[-1][1])
        for v in [v for v in snapshots if v != version and pinned[v] <= 0]:
            del snapshots[v]
        if left[device] > 0:
            idle.append(device)
        dispatch()

    if not curve or curve[-1][0] != version:
        curve.append((version, score()))
    max_eps = 0.0
    if mech.release is not None and included:
        max_eps = history_epsilon(((mech.release, max(included.values())),), cfg.delta)
    return PopulationResult(
        config=cfg,
        devices=n,
        accuracy=curve[-1][1],
        best_accuracy=max(a for _, a in curve),
        curve=curve,
        steps=version,
        contributions=contributions,
        dropped_stale=dropped,
        max_epsilon=max_eps,
        noise=mech.noise,
        mean_staleness=staleness_sum / max(1, contributions),
        seconds=time.perf_counter() - started,
    )


def for_fleet(devices: int, **overrides: Any) -> PopulationConfig:
    """The settings ``benchmarks/privacy_utility.py`` uses for a fleet of ``devices`` (docs/privacy.md).

    Half the fleet per step (K = N / 2, at most 2,000) and 70 % of it training at once; 50
    releases per device up to 1,000 devices, 10 beyond (a 10,000-device run stays in minutes).
    The noise's survivor floor is 90 % of K. Chosen by measurement on the speech task at 1,000
    devices; the reasons are in docs/privacy.md.
    """
    k = max(2, min(2000, devices // 2))
    base = PopulationConfig(
        buffer=k,
        survivors=max(2, math.ceil(0.9 * k)),
        concurrency=max(k, min(devices, math.ceil(0.7 * devices), 2 * k)),
        releases=50 if devices <= 1000 else 10,
    )
    return replace(base, **overrides)
