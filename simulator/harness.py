"""Run a whole federation on one machine over a real broker.

Every agent is a real :class:`edge_agent.service.AgentService` with its own MQTT
connection; they share one event loop and one worker-thread pool (no per-agent threads
or timers). Heterogeneity comes from simulated compute times: each agent waits a draw
from a straggler distribution after each local round, as a slower device would.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from aggregator.service import AggregatorService, Progress
from broker.launcher import start_broker
from edge_agent.service import AgentService
from edge_agent.trainer import LocalTrainer
from fedmq.config import AgentConfig, AggregatorConfig, BrokerConfig, Config, PrivacyConfig, StalenessConfig
from fedmq.errors import ConfigError
from models.datasets import Dataset
from models.speech import SpeechUnavailable, SynthesisFailed
from models.tasks import get_task
from simulator.attacks import ATTACKS, plan_attack

log = logging.getLogger("fedmq.simulate")


@dataclass(frozen=True)
class Stragglers:
    """Simulated compute time per local round: log-normal around ``median`` seconds, plus a slow tail.

    ``slow_fraction`` of the agents (chosen by seed) are ``slow_factor`` times slower.
    ``median = 0`` disables simulated delays.
    """

    median: float = 0.1
    sigma: float = 0.5
    slow_fraction: float = 0.1
    slow_factor: float = 5.0

    def validate(self) -> None:
        """Raise ValueError on nonsense parameters."""
        if self.median < 0 or self.sigma < 0 or not 0 <= self.slow_fraction <= 1 or self.slow_factor < 1:
            raise ValueError("stragglers: need median >= 0, sigma >= 0, 0 <= slow_fraction <= 1, slow_factor >= 1")

    def delays(self, agents: int, rng: random.Random) -> list[Callable[[], float] | None]:
        """One delay function per agent (``None`` when delays are off)."""
        if self.median == 0:
            return [None] * agents
        slow = set(rng.sample(range(agents), round(self.slow_fraction * agents)))
        out: list[Callable[[], float] | None] = []
        for i in range(agents):
            factor = self.slow_factor if i in slow else 1.0
            out.append(self._delay_fn(random.Random(rng.random()), factor))
        return out

    def _delay_fn(self, r: random.Random, factor: float) -> Callable[[], float]:
        return lambda: factor * self.median * math.exp(r.gauss(0.0, self.sigma))


@dataclass(frozen=True)
class SimConfig:
    """One simulated run. ``aggregator`` and ``privacy`` are the same sections a deployment uses."""

    agents: int = 20
    task: str = "digits"
    """The example's data (:mod:`models.tasks`): digits, speech, hospitals, hospitals-imaging."""
    alpha: float = 0.5
    duration: float = 30.0
    broker: str = "auto"
    seed: int = 0
    local_epochs: int = 5
    batch_size: int = 16
    lr: float = 0.3
    stragglers: Stragglers = field(default_factory=Stragglers)
    aggregator: AggregatorConfig = field(
        default_factory=lambda: AggregatorConfig(
            rule="fedbuff",
            # One update per device per buffer: K well below the number of devices keeps FedBuff
            # asynchronous (the demo's 20 devices: 10; K = 20 of 20 waits for the slowest each time).
            buffer_size=10,
            server_lr=0.5,
            eval_every=1,
            metrics_interval=0.5,
            staleness=StalenessConfig("polynomial", 0.5),
            max_staleness=20,
            # Simulated devices finish a round in about 0.1 s (10 updates/s), real ones in seconds:
            # the limit is twice the median simulated rate, as aggregator.rate_limit advises.
            rate_limit=20.0,
        )
    )
    privacy: PrivacyConfig = field(default_factory=lambda: PrivacyConfig(clip_norm=1.0, noise_multiplier=0.5))
    prefix: str = "fedmq/sim"
    attack: str = "none"
    """Byzantine behaviour of the malicious agents (see :mod:`simulator.attacks`)."""
    malicious_fraction: float = 0.0
    verify_dp: bool = True
    """With DP on, the aggregator rejects updates not noised as agreed (``not_private``)."""
    conforming_attack: bool = False
    """With DP on, attackers add the agreed noise and keep their signal inside the norm check."""
    compression: str = "none"
    """Update compression of every agent: none, fp16, int8, topk (``agent.compression``)."""
    topk_fraction: float = 0.01

    def validate(self) -> SimConfig:
        """Raise ValueError / ConfigError on the first invalid field."""
        if self.agents < 1:
            raise ValueError("agents must be >= 1")
        task = get_task(self.task)
        if task.max_devices is not None and self.agents > task.max_devices:
            raise ValueError(f"--agents: task {self.task!r} has {task.max_devices} devices, got {self.agents}")
        if self.duration <= 0:
            raise ValueError("duration must be > 0")
        self.stragglers.validate()
        if self.attack not in ATTACKS:
            raise ValueError(f"attack must be one of {', '.join(ATTACKS)}, got {self.attack!r}")
        if not 0 <= self.malicious_fraction < 1:
            raise ValueError("malicious_fraction must be in [0, 1)")
        self.aggregator.validate()
        self.privacy.validate()
        AgentConfig(
            agent_id="agent-0",
            local_epochs=self.local_epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            compression=self.compression,
            topk_fraction=self.topk_fraction,
        ).validate()
        return self


def split_task(cfg: SimConfig) -> tuple[list[Dataset], Dataset]:
    """The task's per-device training sets (one per agent) and its held-out test set."""
    return get_task(cfg.task).load(cfg.agents, cfg.seed, cfg.alpha)


def for_task(cfg: SimConfig, *, torch: bool = False) -> SimConfig:
    """``cfg`` with the task's model, labels and training recipe (the demo's settings for it).

    Set ``cfg.agents`` first: FedBuff's K is capped at the number of devices.
    """
    task = get_task(cfg.task)
    model = task.torch_model if torch and task.torch_model else task.model
    overrides = task.aggregator_settings(model)
    agg = replace(cfg.aggregator, model=model, hidden=task.hidden, labels=",".join(task.labels), **overrides)
    agg = replace(agg, buffer_size=min(agg.buffer_size, cfg.agents))
    return replace(
        cfg,
        aggregator=agg,
        privacy=replace(cfg.privacy, enabled=cfg.privacy.enabled and task.local_dp),
        **task.recipe,
    )


async def run_federation(
    cfg: SimConfig,
    host: str,
    port: int,
    *,
    shards: list[Dataset],
    test: Dataset,
    on_progress: Callable[[Progress], None] | None = None,
    stop: asyncio.Event | None = None,
    on_dashboard: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run aggregator and agents against an already running broker; return the summary.

    ``on_dashboard`` is called with the dashboard's URL once the aggregator serves it
    (``cfg.aggregator.http`` set).
    """
    stop = stop or asyncio.Event()
    base = Config(
        prefix=cfg.prefix,
        broker=BrokerConfig(host=host, port=port),
        aggregator=replace(
            cfg.aggregator,
            num_features=test.x.shape[1],
            num_classes=max(int(max(test.y.max(), *(s.y.max() for s in shards))) + 1, len(cfg.aggregator.label_names)),
        ),
        privacy=cfg.privacy,
    )
    p = cfg.privacy
    # A top-k update's norm says nothing about its noise: the DP check would refuse every one.
    # ... and under secure aggregation no individual update is seen to be checked.
    verify = cfg.verify_dp and cfg.compression != "topk" and not cfg.aggregator.secure_aggregation
    if verify and p.enabled and p.noise_multiplier > 0 and base.aggregator.dp_noise_multiplier is None:
        agg = replace(base.aggregator, dp_noise_multiplier=p.noise_multiplier, dp_clip_norm=p.clip_norm)
        base = replace(base, aggregator=agg)
    if base.aggregator.rule == "fedavg" and base.aggregator.sync_agents == 0:
        base = replace(base, aggregator=replace(base.aggregator, sync_agents=len(shards)))
    service = AggregatorService(base, eval_data=test, on_progress=on_progress)
    service.startup()
    rng = random.Random(cfg.seed)
    delays = cfg.stragglers.delays(len(shards), rng)
    conform = None
    assert service.core is not None
    dim = sum(int(w.size) for w in service.core.weights.values())
    if cfg.conforming_attack and p.enabled and p.noise_multiplier > 0:
        conform = (dim, p.noise_multiplier * p.clip_norm, p.clip_norm)
    # Where an honestly noised update's norm lies (the agreed noise, even when DP is off here).
    window_norm = math.sqrt(dim) * max(p.noise_multiplier, 0.5) * p.clip_norm
    plan = plan_attack(
        cfg.attack,
        cfg.malicious_fraction,
        len(shards),
        num_classes=base.aggregator.num_classes,
        buffer_size=base.aggregator.buffer_size,
        server_lr=base.aggregator.server_lr,
        seed=cfg.seed,
        conform_to=conform,
        window_norm=window_norm,
    )
    agents: list[AgentService] = []
    for i, shard in enumerate(shards):
        acfg = AgentConfig(
            agent_id=f"agent-{i}",
            local_epochs=cfg.local_epochs,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            round_interval=0.0,
            compression=cfg.compression,
            topk_fraction=cfg.topk_fraction,
        )
        trainer = LocalTrainer(acfg, cfg.privacy, plan.data_for(i, shard), rng=np.random.default_rng([cfg.seed, i]))
        trainer.steps = plan.steps_for(i, trainer.steps, np.random.default_rng([cfg.seed, i, 7]))
        delay = delays[i]
        if i in plan.malicious and plan.speedup != 1 and delay is not None:
            delay = _faster(delay, plan.speedup)
        agents.append(
            AgentService(replace(base, agent=acfg), trainer, compute_delay=delay, rng=random.Random(rng.random()))
        )
    agent_stop = asyncio.Event()
    started = time.monotonic()
    async with asyncio.TaskGroup() as tg:
        server = tg.create_task(service.run(stop))
        if on_dashboard is not None and cfg.aggregator.http:
            tg.create_task(_announce(service, on_dashboard))
        for a in agents:
            tg.create_task(a.run(agent_stop))
        # Until the aggregator is done (target, max versions), the duration is over, or stop is set.
        waiters = [asyncio.ensure_future(service.done.wait()), asyncio.ensure_future(stop.wait())]
        await asyncio.wait(waiters, timeout=cfg.duration, return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            w.cancel()
        stop.set()
        summary = await server
        agent_stop.set()
    summary["agents"] = len(agents)
    task = get_task(cfg.task)
    summary["task"] = task.name
    summary["model"] = base.aggregator.model
    summary["test_set"] = task.test_description
    summary["task_target_accuracy"] = task.target_accuracy
    summary["training_examples"] = sum(len(s) for s in shards)
    summary["range_warnings"] = sum(a.trainer.range_warning is not None for a in agents)
    summary["attack"] = cfg.attack
    summary["malicious_agents"] = len(plan.malicious)
    summary["updates_published"] = sum(a.stats.updates_published for a in agents)
    eps = [a.trainer.epsilon for a in agents if a.trainer.epsilon is not None]
    # The aggregator's own figure (its ledger of released sums, under central or distributed DP);
    # the devices' is at least as large (a device charges each masked upload as it leaves).
    summary["federation_epsilon"] = summary.get("max_epsilon") if _server_dp(base.aggregator) else None
    summary["max_epsilon"] = max(eps) if eps else None
    summary["delta"] = cfg.privacy.delta if cfg.privacy.enabled else base.aggregator.dp_delta if eps else None
    summary["privacy"] = dataclasses.asdict(cfg.privacy)
    summary["budget_exhausted_agents"] = sum(a.trainer.exhausted is not None for a in agents)
    summary["wall_seconds"] = round(time.monotonic() - started, 2)
    return summary


def _server_dp(agg: AggregatorConfig) -> bool:
    """Whether the aggregator keeps a privacy ledger (central DP, or distributed DP in cohorts)."""
    return agg.central_dp_noise_multiplier is not None or agg.secagg.dp_epsilon is not None


def _faster(delay: Callable[[], float], speedup: float) -> Callable[[], float]:
    return lambda: delay() / speedup


async def _announce(service: AggregatorService, on_dashboard: Callable[[str], None]) -> None:
    await service.ready.wait()
    if service.http is not None:
        on_dashboard(service.http.url)


async def run_simulation(
    cfg: SimConfig,
    *,
    on_progress: Callable[[Progress], None] | None = None,
    stop: asyncio.Event | None = None,
    on_dashboard: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Start a broker (Mosquitto if available, else embedded), run the federation, stop the broker."""
    cfg.validate()
    try:
        shards, test = await asyncio.to_thread(split_task, cfg)
    except SynthesisFailed as exc:  # this espeak-ng build lacks a voice the generator uses
        raise ConfigError("espeak-ng", str(exc)) from None
    except ValueError as exc:  # more devices than the data set can give
        raise ConfigError("--agents", f"task {cfg.task!r}: {exc}") from None
    except SpeechUnavailable as exc:
        raise ConfigError("espeak-ng", str(exc)) from None
    broker = await asyncio.to_thread(start_broker, cfg.broker)
    try:
        summary = await run_federation(
            cfg,
            broker.host,
            broker.port,
            shards=shards,
            test=test,
            on_progress=on_progress,
            stop=stop,
            on_dashboard=on_dashboard,
        )
    finally:
        await asyncio.to_thread(broker.cleanup)
    summary["broker"] = broker.kind
    return summary
