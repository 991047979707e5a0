"""Local training and release, without I/O: model in, encoded-ready update out.

:class:`LocalTrainer` is what the asyncio service runs in a worker thread. It decides
whether a model version is worth training on, trains, computes the delta from the base
version, runs the privacy pipeline and numbers the update. Its durable state (sequence
number and accountant history) lives in one small state file.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.pipeline import BudgetExhausted, GaussianNoiseStep, Release, Step, build_pipeline, run_pipeline
from edge_agent.plan import follow
from edge_agent.privacy import PrivacyAccountant
from fedmq.codec import all_finite
from fedmq.config import AgentConfig, PrivacyConfig
from fedmq.errors import StateError
from fedmq.messages import ModelMessage, ModelSpec, Plan, UpdateMessage, report_examples
from fedmq.secagg.ddp import DdgLedger, DdgParams
from fedmq.state import read_state, write_state
from models import create_model
from models.base import TrainingCancelled
from models.datasets import Dataset, range_mismatch

STATE_KIND = "agent-state"
log = logging.getLogger("fedmq.agent")


class TrainingDiverged(Exception):
    """Local training on one model version produced a non-finite update; the round is skipped.

    The cause is on this device (its data or settings, typically a learning rate too high for
    the model), so it is logged and counted, and the agent goes on with the next version.
    """

    def __init__(self, version: int, tensors: list[str], loss: float) -> None:
        super().__init__(
            f"local training on model version {version} diverged: NaN or Inf in {tensors[:4]} "
            f"(loss {loss:.3g}); skipped, waiting for the next version (lower agent.lr if it repeats)"
        )
        self.version = version
        self.tensors = tensors


class LocalTrainer:
    """Trains one agent's model on its local data and produces privatised updates.

    Args:
        agent: the agent section of the config.
        privacy: the privacy section.
        data: the local data set (never leaves the device).
        rng: injected randomness for shuffling and DP noise.
        state_path: where sequence number and accountant state persist (``None``: memory only,
            and the sequence starts from the clock so that a restarted agent is not a duplicate).
    """

    def __init__(
        self,
        agent: AgentConfig,
        privacy: PrivacyConfig,
        data: Dataset,
        *,
        rng: np.random.Generator,
        state_path: Path | None = None,
    ) -> None:
        if len(data) == 0:
            raise ValueError("the agent's data set is empty")
        self.agent = agent
        self.privacy = privacy
        self.own_agent, self.own_privacy = agent, privacy
        """The device's own settings; :attr:`agent` and :attr:`privacy` are what it trains with (the plan's)."""
        self._plan: Plan | None = None
        self.data = data
        self.rng = rng
        self.state_path = state_path
        self.accountant = PrivacyAccountant(privacy.delta) if privacy.enabled else None
        self.ddp = DdgLedger.empty()
        """Distributed-DP releases: the noised sums this device's masked uploads went into."""
        self._state_lock = threading.Lock()
        self.steps: list[Step] = build_pipeline(
            privacy, rng, self.accountant, compression=agent.compression, topk_fraction=agent.topk_fraction
        )
        self.seq = time.time_ns() // 1_000_000
        self.last_trained_version = -1
        self.exhausted: BudgetExhausted | None = None
        self._model: Any = None
        self._spec: ModelSpec | None = None
        self.range_warning: str | None = None
        """Set when the local data does not match the model's announced input range (logged once)."""
        self._load_state()

    @property
    def epsilon(self) -> float | None:
        """Cumulative epsilon at the configured delta (``None`` without DP).

        Local releases (the Gaussian accountant) and distributed ones (the sums this device's
        masked uploads were in, :attr:`ddp`) add up: basic composition, an upper bound.
        """
        if self.accountant is None and not self.ddp.releases:
            return None
        return self._epsilon_with(self.ddp)

    def _epsilon_with(self, ddp_ledger: DdgLedger) -> float:
        local = self.accountant.epsilon() if self.accountant is not None else 0.0
        return local + ddp_ledger.epsilon(self.privacy.delta)

    def charge_distributed(self, release: DdgParams) -> float:
        """Charge one distributed-DP release before its masked upload leaves; returns the new epsilon.

        Charged at upload, not at the receipt: once the masked vector is out, the aggregator
        may unmask a sum with it whether or not it ever says so.

        Raises:
            BudgetExhausted: the release would take the device past ``privacy.epsilon_budget``
                (nothing is uploaded, and the agent stops).
        """
        trial = DdgLedger(dict(self.ddp.releases))
        trial.record(release)
        after = self._epsilon_with(trial)
        budget = self.privacy.epsilon_budget
        if budget is not None and after > budget:
            self.exhausted = BudgetExhausted(self._epsilon_with(self.ddp), after, budget)
            raise self.exhausted
        self.ddp = trial
        self.save_state()
        return after

    def should_train(self, model: ModelMessage) -> bool:
        """Whether to run a local round on ``model`` now.

        Async mode: always (a device trains continuously on the newest model it has, as in
        FedAsync and FedBuff). Sync mode: only on a version not yet trained on, and only if
        this agent is among the round's selected agents.
        """
        if self.exhausted is not None:
            return False
        if model.mode == "async":
            return True
        return model.version > self.last_trained_version and (
            model.selected is None or self.agent.agent_id in model.selected
        )

    def check_budget(self) -> None:
        """Raise :class:`BudgetExhausted` (and remember it) if no further release is allowed."""
        for step in self.steps:
            if isinstance(step, GaussianNoiseStep):
                try:
                    step.check_budget()
                except BudgetExhausted as exc:
                    self.exhausted = exc
                    raise

    def train(
        self, model: ModelMessage, now: float | None = None, *, cancel: threading.Event | None = None
    ) -> UpdateMessage:
        """Train on ``model`` and return the update to publish (blocking; run it in a thread).

        ``cancel`` abandons the round when it is set before the release: between minibatches,
        or before the privacy pipeline runs (then nothing is released and no budget is spent).

        Raises:
            BudgetExhausted: the privacy budget allows no further release.
            TrainingDiverged: local training produced NaN or Inf (nothing is released or
                accounted; the service waits for the next model version).
            TrainingCancelled: ``cancel`` was set before the release.
            ValueError: the global model does not fit this agent's model or data.
        """
        self.adopt(model.plan)
        self.check_budget()
        local = self._local_model(model)
        local.set_weights(model.tensors)
        result = local.fit(
            self.data.x,
            self.data.y,
            epochs=self.agent.local_epochs,
            batch_size=self.agent.batch_size,
            lr=self.agent.lr,
            rng=self.rng,
            stop=cancel.is_set if cancel is not None else None,
        )
        if cancel is not None and cancel.is_set():
            raise TrainingCancelled
        trained = local.get_weights()
        delta = {k: (trained[k] - model.tensors[k]).astype(model.tensors[k].dtype, copy=False) for k in trained}
        bad = [k for k, v in delta.items() if not all_finite(v)]
        if bad:
            self.last_trained_version = model.version
            raise TrainingDiverged(model.version, bad, result.loss)
        release = run_pipeline(self.steps, Release(delta, result.num_examples, result.loss))
        self.seq += 1
        self.last_trained_version = model.version
        self.save_state()
        return UpdateMessage(
            agent_id=self.agent.agent_id,
            seq=self.seq,
            base_version=model.version,
            # Outside the DP guarantee (docs/protocol.md): a power of two, and no loss, by default.
            num_examples=report_examples(release.num_examples, exact=self.agent.exact_num_examples),
            delta=release.delta,
            train_loss=release.loss if self.agent.send_train_loss else None,
            epsilon=release.epsilon,
            sent_at=time.time() if now is None else now,
            base_run=model.run,
            wire=release.wire,
        )

    def adopt(self, plan: Plan | None) -> list[str]:
        """Train and protect updates as ``plan`` says from now on (see :mod:`edge_agent.plan`).

        The accountant keeps its history: a release records the noise it was made with. Returns
        what changed against the device's own settings (logged when it changes).
        """
        if plan == self._plan:
            return []
        agent, privacy, changes = follow(self.own_agent, self.own_privacy, plan)
        self._plan = plan
        if (agent, privacy) != (self.agent, self.privacy):
            if privacy.enabled and self.accountant is None:
                self.accountant = PrivacyAccountant(privacy.delta)
            self.agent, self.privacy = agent, privacy
            self.steps = build_pipeline(
                privacy, self.rng, self.accountant, compression=agent.compression, topk_fraction=agent.topk_fraction
            )
        if changes:
            log.info("agent %s follows the federation plan: %s", self.agent.agent_id, "; ".join(changes))
        return changes

    def _local_model(self, model: ModelMessage) -> Any:
        spec = model.model
        if spec.num_features != self.data.x.shape[1]:
            raise ValueError(
                f"the global model takes {spec.num_features} features, the local data has {self.data.x.shape[1]}"
            )
        if self._model is None or spec != self._spec:
            self._model = create_model(
                spec.name, num_features=spec.num_features, num_classes=spec.num_classes, hidden=spec.hidden
            )
            if spec.input_range is not None and (self._spec is None or spec.input_range != self._spec.input_range):
                self.range_warning = range_mismatch(self.data.x, spec.input_range)
                if self.range_warning is not None:
                    log.warning("agent %s: %s", self.agent.agent_id, self.range_warning)
            self._spec = spec
        return self._model

    def save_state(self) -> None:
        """Persist sequence number and accountant history atomically (no-op without a state path).

        Training and the distributed-DP charge run in different worker threads: the lock makes
        each write read the state as it is then, so the last file written has every charge.
        """
        if self.state_path is None:
            return
        with self._state_lock:
            self._write_state(self.state_path)

    def _write_state(self, path: Path) -> None:
        write_state(
            path,
            STATE_KIND,
            {
                "agent_id": self.agent.agent_id,
                "seq": self.seq,
                "accountant": self.accountant.state_dict() if self.accountant else None,
                "distributed": self.ddp.to_state(),
            },
        )

    def _load_state(self) -> None:
        if self.state_path is None:
            return
        try:
            state = read_state(self.state_path, STATE_KIND)
        except StateError as exc:
            raise ValueError(str(exc)) from None
        if state is None:
            return
        if state.get("agent_id") != self.agent.agent_id:
            raise ValueError(
                f"{self.state_path} belongs to agent {state.get('agent_id')!r}, not {self.agent.agent_id!r}"
            )
        self.seq = max(self.seq, int(state["seq"]))
        if state.get("accountant") is not None:
            # Kept even while this device's own config has DP off: a plan may turn it on again, and
            # the releases made before still count.
            if self.accountant is None:
                self.accountant = PrivacyAccountant(self.privacy.delta)
            self.accountant.load_state_dict(state["accountant"])
        if state.get("distributed"):
            self.ddp = DdgLedger.from_state(state["distributed"])
