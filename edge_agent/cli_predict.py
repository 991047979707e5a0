"""``fedmq predict``: serve predictions of an exported global model with onnxruntime (no torch)."""

from __future__ import annotations

import argparse
import json

import numpy as np

from fedmq.errors import ConfigError
from models.datasets import load_source


def configure(p: argparse.ArgumentParser) -> None:
    """Add the command's arguments."""
    p.add_argument("model", help="an ONNX file written by fedmq (models.onnx_export)")
    p.add_argument("data", help="inputs: .npz with x (and y, to report accuracy), folder, or module:function")


def run(args: argparse.Namespace) -> int:
    """Print predictions (and accuracy when labels are present) as JSON."""
    try:
        from models.onnx_export import OnnxPredictor
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ConfigError("predict", f"needs onnxruntime: pip install 'fedmq[onnx]' ({exc})") from None
    try:
        data = load_source(args.data)
    except (ValueError, OSError) as exc:
        raise ConfigError("data", str(exc)) from None
    predictor = OnnxPredictor(args.model)
    pred = predictor.predict(data.x)
    out = {
        "version": predictor.version,
        "n": len(pred),
        "accuracy": float(np.mean(pred == data.y)),
        "predictions": pred[:20].tolist(),
    }
    print(json.dumps(out))
    return 0
