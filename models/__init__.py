"""Model definitions and training backends (numpy always, torch optional), ONNX export.

Imports no role package; both the agent and the aggregator use it.
"""

from models.base import Model, TrainResult
from models.registry import MODEL_NAMES, create_model

__all__ = ["MODEL_NAMES", "Model", "TrainResult", "create_model"]
