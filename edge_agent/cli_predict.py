"""``fedmq predict``: predictions of an exported global model with onnxruntime (no torch).

The input is a data source (``.npz``, folder, ``module:function``) or one or more WAV files,
which go through the keyword-spotting features of :mod:`models.audio` (the speech task).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from fedmq.errors import ConfigError
from models.datasets import load_inputs
from runtime.extras import require

if TYPE_CHECKING:
    from models.onnx_export import OnnxPredictor


def configure(p: argparse.ArgumentParser) -> None:
    """Add the command's arguments."""
    p.add_argument("model", metavar="MODEL.onnx", help="an ONNX file written by fedmq (fedmq agent --onnx-out)")
    p.add_argument(
        "data",
        nargs="+",
        metavar="DATA",
        help="WAV file(s) of a spoken keyword, or inputs: .npz with x (and y, to report accuracy), a folder "
        "with x.npy (and y.npy), or module:function",
    )
    p.add_argument(
        "--out",
        metavar="FILE.csv",
        help="also write every prediction as CSV: index, class, label, probability (and y when given)",
    )


def run(args: argparse.Namespace) -> int:
    """Print the predicted word of each WAV, or every prediction of a data set (and its accuracy), as JSON."""
    require("onnx", key="predict", why="fedmq predict", modules=("onnxruntime",))
    from models.onnx_export import OnnxPredictor

    if not Path(args.model).is_file():
        raise ConfigError("model", f"no such file: {args.model} (write one with fedmq agent --onnx-out PATH)")
    try:
        predictor = OnnxPredictor(args.model)
    except Exception as exc:  # onnxruntime raises its own types for a corrupt file
        raise ConfigError("model", f"{args.model}: not a loadable ONNX model ({exc})") from None
    wavs = [d for d in args.data if d.lower().endswith(".wav")]
    if wavs:
        if len(wavs) != len(args.data):
            raise ConfigError("data", "give either WAV files or one data source, not both")
        return _predict_wavs(predictor, wavs)
    if len(args.data) != 1:
        raise ConfigError("data", "give one data source (or several WAV files)")
    try:
        x, y = load_inputs(args.data[0])
    except (ValueError, OSError, ImportError, AttributeError) as exc:
        raise ConfigError("data", str(exc)) from None
    _check_width(predictor.num_features, x.shape[1], args.data[0])
    proba = predictor.predict_proba(x)
    pred = np.argmax(proba, axis=1)
    out: dict[str, object] = {"version": predictor.version, "n": len(pred)}
    if y is not None:
        out["accuracy"] = float(np.mean(pred == y))
    out["predictions"] = pred.tolist()
    if predictor.labels:
        out["predicted_labels"] = [_label(predictor, int(k)) for k in pred]
    if args.out:
        _write_csv(Path(args.out), predictor, proba, pred, y)
        out["written"] = args.out
    print(json.dumps(out))
    return 0


def _label(predictor: OnnxPredictor, k: int) -> str:
    return predictor.labels[k] if k < len(predictor.labels) else str(k)


def _write_csv(
    path: Path,
    predictor: OnnxPredictor,
    proba: npt.NDArray[np.float32],
    pred: npt.NDArray[np.intp],
    y: npt.NDArray[np.int64] | None,
) -> None:
    try:
        with path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["index", "class", "label", "probability", *(["y"] if y is not None else [])])
            for i, k in enumerate(pred):
                row = [i, int(k), _label(predictor, int(k)), f"{float(proba[i, k]):.6f}"]
                writer.writerow(row + ([int(y[i])] if y is not None else []))
    except OSError as exc:
        raise ConfigError("--out", f"cannot write {path}: {exc}") from None


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
