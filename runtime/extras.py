"""Optional extras, checked when a command starts rather than discovered at its first use.

``pip install fedmq`` installs what a device needs. Each command calls :func:`require` for the
features its configuration turns on, so that a missing extra stops it at startup with the
``pip install`` line, not with a traceback (or a warning at every model version) later.
"""

from __future__ import annotations

import importlib.util

from fedmq.errors import MissingExtra

EXTRAS: dict[str, tuple[str, ...]] = {
    "server": ("sklearn", "prometheus_client"),
    "demo": ("sklearn", "prometheus_client", "amqtt", "matplotlib"),
    "onnx": ("onnx", "onnxruntime"),
    "torch": ("torch",),
    "cluster": ("nats",),
}
"""Each extra's importable modules (pyproject.toml's optional-dependencies, by import name)."""


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(extra: str, *, key: str, why: str, modules: tuple[str, ...] | None = None) -> None:
    """Raise :class:`MissingExtra` naming ``extra`` unless ``modules`` (default: all of it) import.

    Args:
        extra: the extra's name in pyproject.toml.
        key: the config key or flag that asked for the feature.
        why: the feature, for the message ("--onnx-out").
        modules: the part of the extra the feature needs.
    """
    for module in modules if modules is not None else EXTRAS[extra]:
        if not installed(module):
            raise MissingExtra(key, extra, why, "scikit-learn" if module == "sklearn" else module)


def require_for_data(spec: str | None, key: str) -> None:
    """Bundled data sets (``builtin:...``) come from scikit-learn."""
    if spec is not None and spec.startswith("builtin:"):
        require("demo", key=key, why=f"the bundled data set {spec!r}", modules=("sklearn",))
