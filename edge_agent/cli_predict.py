"""``fedmq predict``: predictions of an exported global model with onnxruntime (no torch).

The input is a data source (``.npz``, folder, ``module:function``) or one or more WAV files,
which go through the keyword-spotting features of :mod:`models.audio` (the speech task).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedmq.errors import ConfigError
from models.datasets import load_source

if TYPE_CHECKING:
    from models.onnx_export import OnnxPredictor


def configure(p: argparse.ArgumentParser) -> None:
    """Add the command's arguments."""
    p.add_argument("model", help="an ONNX file written by fedmq (fedmq agent --onnx-out, models.onnx_export)")
    p.add_argument(
        "data",
        nargs="+",
        help="WAV file(s) of a spoken keyword, or inputs: .npz with x (and y, to report accuracy), folder, "
        "or module:function",
    )


def run(args: argparse.Namespace) -> int:
    """Print the predicted word of each WAV, or predictions and accuracy of a data set, as JSON lines."""
    try:
        from models.onnx_export import OnnxPredictor
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ConfigError("predict", f"needs onnxruntime: pip install 'fedmq[onnx]' ({exc})") from None
    try:
        predictor = OnnxPredictor(args.model)
    except Exception as exc:  # onnxruntime raises its own types for a missing or corrupt file
        raise ConfigError("model", f"{args.model}: not a loadable ONNX model ({exc})") from None
    wavs = [d for d in args.data if d.lower().endswith(".wav")]
    if wavs:
        if len(wavs) != len(args.data):
            raise ConfigError("data", "give either WAV files or one data source, not both")
        return _predict_wavs(predictor, wavs)
    if len(args.data) != 1:
        raise ConfigError("data", "give one data source (or several WAV files)")
    try:
        data = load_source(args.data[0])
    except (ValueError, OSError) as exc:
        raise ConfigError("data", str(exc)) from None
    _check_width(predictor.num_features, data.x.shape[1], args.data[0])
    pred = predictor.predict(data.x)
    out = {
        "version": predictor.version,
        "n": len(pred),
        "accuracy": float(np.mean(pred == data.y)),
        "predictions": pred[:20].tolist(),
    }
    if predictor.labels:
        out["predicted_labels"] = [predictor.labels[i] for i in pred[:20] if i < len(predictor.labels)]
    print(json.dumps(out))
    return 0


def _check_width(model_features: int, data_features: int, what: str) -> None:
    if model_features != data_features:
        raise ConfigError("data", f"{what} has {data_features} features, the model takes {model_features}")


def _predict_wavs(predictor: OnnxPredictor, wavs: list[str]) -> int:
    from models.audio import NUM_FEATURES, wav_features

    _check_width(predictor.num_features, NUM_FEATURES, "a keyword WAV (14 x 14 log-mel features)")
    for path in wavs:
        try:
            feats = wav_features(Path(path))
        except (ValueError, OSError) as exc:
            raise ConfigError("data", f"{path}: {exc}") from None
        proba = predictor.predict_proba(feats[None, :])[0]
        k = int(np.argmax(proba))
        word = predictor.labels[k] if k < len(predictor.labels) else str(k)
        print(json.dumps({"wav": path, "word": word, "probability": round(float(proba[k]), 4), "class": k}))
    return 0
