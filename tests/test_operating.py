"""Operating fedmq as a new user does (issue 15): each problem a user hit, as a test.

`fedmq predict`, missing extras named at startup, help text, broker readiness on a busy port,
adding a device to a running broker, and the hints a misconfigured connection gets.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from cli.main import main as fedmq_main
from models import create_model
from models.datasets import digits

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def digits_onnx(tmp_path: Path) -> Path:
    pytest.importorskip("onnxruntime")
    from models.onnx_export import export_onnx

    m = create_model("softmax", num_features=64, num_classes=10)
    return export_onnx("softmax", m.get_weights(), tmp_path / "d.onnx", num_features=64, num_classes=10, version=3)


# --- fedmq predict -----------------------------------------------------------------------------


def test_predict_prints_every_prediction_and_writes_them_as_csv(
    tmp_path: Path, digits_onnx: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, test = digits()
    np.savez(tmp_path / "t.npz", x=test.x, y=test.y)
    out_csv = tmp_path / "pred.csv"
    assert fedmq_main(["predict", str(digits_onnx), str(tmp_path / "t.npz"), "--out", str(out_csv)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == len(test.y) == len(out["predictions"]) > 20
    assert out["accuracy"] == pytest.approx(float(np.mean(np.array(out["predictions"]) == test.y)))
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == len(test.y)
    assert [int(r["class"]) for r in rows] == out["predictions"]
    assert [int(r["y"]) for r in rows] == test.y.tolist()


def test_predict_takes_inputs_without_labels(
    tmp_path: Path, digits_onnx: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, test = digits()
    np.savez(tmp_path / "x_only.npz", x=test.x[:50])
    assert fedmq_main(["predict", str(digits_onnx), str(tmp_path / "x_only.npz")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 50 and len(out["predictions"]) == 50
    assert "accuracy" not in out
    folder = tmp_path / "folder"
    folder.mkdir()
    np.save(folder / "x.npy", test.x[:7])
    assert fedmq_main(["predict", str(digits_onnx), str(folder)]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 7


def test_predict_names_a_missing_model_without_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("onnxruntime")
    np.savez(tmp_path / "x.npz", x=np.zeros((2, 64), np.float32))
    assert fedmq_main(["predict", str(tmp_path / "missing.onnx"), str(tmp_path / "x.npz")]) == 2
    err = capsys.readouterr().err
    assert "no such file" in err and "missing.onnx" in err and "Traceback" not in err


def test_predict_without_onnxruntime_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    assert fedmq_main(["predict", str(tmp_path / "m.onnx"), str(tmp_path / "x.npz")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'fedmq[onnx]'" in err and "onnxruntime" in err and "Traceback" not in err
