"""The runnable examples: each task names its data, its split across devices, its model and its recipe.

A task is what ``fedmq demo --task``, ``fedmq simulate --task``, ``fedmq data split`` and the
benchmarks share, so that a result in the README can be reproduced by name.

=====================  =========================================  ==============  ===========
task                   data                                       devices         model
=====================  =========================================  ==============  ===========
``digits``             scikit-learn's 8x8 digits, Dirichlet split  any (20)        softmax
``speech``             espeak-ng households saying 10 keywords     any (100)       mlp / speech-cnn
``hospitals``          breast-cancer cases in 5 hospitals          up to 5         mlp
``hospitals-imaging``  synthetic cell images in 5 hospitals        up to 5         med-cnn / mlp
=====================  =========================================  ==============  ===========
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models.datasets import Dataset, digits, dirichlet_split


@dataclass(frozen=True)
class Task:
    """A federated example: how to make each device's data and the held-out test set, and what to train."""

    name: str
    summary: str
    model: str
    """The numpy model (a Raspberry Pi agent trains it)."""
    torch_model: str | None
    labels: tuple[str, ...]
    input_range: tuple[float, float]
    """What the model's inputs are scaled to (``docs/protocol.md``); agents warn on data far outside it."""
    hidden: int
    default_devices: int
    max_devices: int | None
    target_accuracy: float
    """The accuracy the README's time-to-accuracy figure is measured at."""
    make: Callable[[int, int, float], tuple[list[Dataset], Dataset]] = field(repr=False)
    """``make(devices, seed, alpha)``: per-device training sets and the test set."""
    recipe: dict[str, Any] = field(default_factory=dict)
    """Training settings the demo uses (SimConfig field names)."""
    aggregator: dict[str, Any] = field(default_factory=dict)
    """Aggregator settings the demo uses (AggregatorConfig field names; ``buffer_size`` is capped
    at the number of devices)."""
    torch_aggregator: dict[str, Any] = field(default_factory=dict)
    """Overrides of :attr:`aggregator` for the torch model (``--torch``)."""
    secure_aggregator: dict[str, Any] = field(default_factory=dict)
    """Overrides of :attr:`aggregator` under secure aggregation (``--secure-aggregation``)."""
    local_dp: bool = True
    """Whether the demo adds local DP noise on each device. Off where a model is too large for
    per-device noise to leave any signal, or the devices too few for device-level DP to mean
    much: those examples are protected with secure aggregation (``--secure-aggregation``)."""
    test_description: str = "held-out split"

    def aggregator_settings(self, model: str, *, secure: bool = False) -> dict[str, Any]:
        """The AggregatorConfig fields this task sets for ``model``, under secure aggregation or not."""
        out = dict(self.aggregator)
        if model == self.torch_model:
            out.update(self.torch_aggregator)
        if secure:
            out.update(self.secure_aggregator)
        return out

    @property
    def num_classes(self) -> int:
        """Number of output classes."""
        return len(self.labels)

    def load(self, devices: int | None = None, seed: int = 0, alpha: float = 0.5) -> tuple[list[Dataset], Dataset]:
        """Per-device training sets and the test set.

        Raises:
            ValueError: more devices than the task has (the hospitals are five).
        """
        n = self.default_devices if devices is None else devices
        if n < 1:
            raise ValueError(f"need at least one device, got {n}")
        if self.max_devices is not None and n > self.max_devices:
            raise ValueError(f"task {self.name!r} has {self.max_devices} devices, {n} were asked for")
        return self.make(n, seed, alpha)


def _digits(devices: int, seed: int, alpha: float, test_fraction: float = 0.2) -> tuple[list[Dataset], Dataset]:
    train, test = digits(test_fraction=test_fraction, seed=seed)
    if len(train) < devices:
        raise ValueError(f"digits has {len(train)} training images, too few for {devices} devices")
    parts = dirichlet_split(
        train.y, devices, alpha, np.random.default_rng(seed), min_size=max(1, min(10, len(train) // devices))
    )
    return [train.subset(p) for p in parts], test


def _speech(devices: int, seed: int, alpha: float) -> tuple[list[Dataset], Dataset]:
    from models import speech

    return speech.households(devices, seed), speech.held_out_set(seed)


def _hospitals(devices: int, seed: int, alpha: float) -> tuple[list[Dataset], Dataset]:
    from models import medical

    return medical.breast_cancer_hospitals(seed, medical.HOSPITALS[:devices])


def _cells(devices: int, seed: int, alpha: float) -> tuple[list[Dataset], Dataset]:
    from models import medical

    return medical.cell_hospitals(seed, hospitals=medical.HOSPITALS[:devices])


TASKS: dict[str, Task] = {
    "digits": Task(
        name="digits",
        summary="scikit-learn's 8x8 handwritten digits (1,797), Dirichlet(alpha) non-IID over devices",
        model="softmax",
        torch_model="digits-cnn",
        labels=tuple(str(d) for d in range(10)),
        input_range=(0.0, 1.0),
        hidden=64,
        default_devices=20,
        max_devices=None,
        target_accuracy=0.9,
        make=_digits,
    ),
    "speech": Task(
        name="speech",
        summary="smart-speaker households saying 10 keywords, synthesised with espeak-ng (models/speech.py)",
        model="mlp",
        torch_model="speech-cnn",
        labels=("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"),
        input_range=(0.0, 1.0),
        hidden=128,
        default_devices=100,
        max_devices=None,
        target_accuracy=0.6,
        recipe={"lr": 0.2, "local_epochs": 2, "batch_size": 16},
        # Stale updates hurt this task: held-out accuracy after 30 s was 0.68 at max_staleness 10,
        # 0.59 at 20 and 0.52 at 50 (100 households, K = 10).
        aggregator={"max_staleness": 10},
        # Under secure aggregation an update waits in the pool for its cohort and ages there:
        # 0.53 after 30 s at max_staleness 5, 0.20 at 10 (docs/examples.md).
        secure_aggregator={"max_staleness": 5},
        # 100 speech-cnn agents train slower in one process (torch from 6 worker threads), so
        # their updates are older: 0.61 after 71 s at max_staleness 20, 0.12 at 10 (before He init).
        torch_aggregator={"max_staleness": 20},
        local_dp=False,
        make=_speech,
        test_description="held-out voices (1,200 utterances by 40 speakers no household has)",
    ),
    "hospitals": Task(
        name="hospitals",
        summary="breast-cancer diagnosis (scikit-learn's WDBC, 569 cases) in 5 hospitals of different sizes",
        model="mlp",
        torch_model=None,
        labels=("malignant", "benign"),
        input_range=(0.0, 1.0),
        hidden=32,
        default_devices=5,
        max_devices=5,
        target_accuracy=0.93,
        recipe={"lr": 0.1, "local_epochs": 2, "batch_size": 16},
        aggregator={"buffer_size": 3},
        local_dp=False,
        make=_hospitals,
        test_description="stratified held-out fifth of the cases",
    ),
    "hospitals-imaging": Task(
        name="hospitals-imaging",
        summary="synthetic 28x28 cell images (generated, not medical data) in 5 hospitals with scanner skew",
        model="mlp",
        torch_model="med-cnn",
        labels=("normal", "enlarged-nucleus", "multinucleated", "irregular"),
        input_range=(0.0, 1.0),
        hidden=64,
        default_devices=5,
        max_devices=5,
        target_accuracy=0.6,
        recipe={"lr": 0.1, "local_epochs": 1, "batch_size": 32},
        aggregator={"buffer_size": 3},
        local_dp=False,
        make=_cells,
        test_description="800 images from a reference scanner, balanced classes",
    ),
}


def get_task(name: str) -> Task:
    """The task called ``name``.

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}") from None
