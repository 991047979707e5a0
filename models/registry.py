"""Models by name. Torch models are imported lazily so that numpy-only installs never load torch."""

from __future__ import annotations

from models.base import Model

MODEL_NAMES = ("softmax", "mlp", "digits-cnn", "med-cnn", "speech-cnn")
"""``softmax`` and ``mlp`` are numpy (default); ``digits-cnn`` (8x8), ``med-cnn`` (28x28) and
``speech-cnn`` (14x14 log-mel) need torch. ``docs/protocol.md`` defines each one's tensors."""

TORCH_MODELS = {"digits-cnn": (1, 8, 8), "med-cnn": (1, 28, 28), "speech-cnn": (1, 14, 14)}


def create_model(name: str, *, num_features: int, num_classes: int, hidden: int = 64, seed: int = 0) -> Model:
    """Return a freshly initialised model; the same ``seed`` gives the same weights.

    Raises:
        ValueError: unknown name, or features that do not fit the model's input.
        ImportError: a torch model without torch installed (``pip install 'fedmq[torch]'``).
    """
    if name == "softmax":
        from models.numpy_backend import SoftmaxRegression

        return SoftmaxRegression(num_features, num_classes, seed=seed)
    if name == "mlp":
        from models.numpy_backend import MLP

        return MLP(num_features, num_classes, hidden=hidden, seed=seed)
    if name in TORCH_MODELS:
        shape = TORCH_MODELS[name]
        if num_features != shape[0] * shape[1] * shape[2]:
            raise ValueError(
                f"model {name!r} takes {shape} images ({shape[1] * shape[2]} features), got {num_features} features"
            )
        try:
            from models import torch_backend
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ImportError(f"model {name!r} needs torch: pip install 'fedmq[torch]'") from exc
        module = torch_backend.MODULES[name](num_classes)
        return torch_backend.TorchModel(name, module, shape, seed=seed)
    raise ValueError(f"unknown model {name!r}; known: {', '.join(MODEL_NAMES)}")
