"""Tier 1: numpy backends against finite differences, data splits and sources, torch and ONNX parity."""

from __future__ import annotations

import importlib.util
import io
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from models import create_model
from models.base import evaluate, flatten, unflatten
from models.datasets import Dataset, digits, dirichlet_split, load_source, save_npz

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_ONNX = importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None


@pytest.mark.parametrize("name", ["softmax", "mlp"])
def test_numpy_gradients_match_finite_differences(name: str) -> None:
    rng = np.random.default_rng(0)
    m = create_model(name, num_features=6, num_classes=3, hidden=5, seed=1)
    x = rng.standard_normal((7, 6)).astype(np.float32)
    y = rng.integers(0, 3, 7)
    w = {k: v.astype(np.float64) for k, v in m.get_weights().items()}
    _, grads = m._grads(x.astype(np.float64), y)  # type: ignore[attr-defined]

    def loss_at(k: str, idx: tuple[int, ...], eps: float) -> float:
        w2 = {kk: vv.copy() for kk, vv in w.items()}
        w2[k][idx] += eps
        m._w = w2  # type: ignore[attr-defined]
        loss, _ = m._grads(x.astype(np.float64), y)  # type: ignore[attr-defined]
        return float(loss)

    for k, g in grads.items():
        for idx in list(np.ndindex(g.shape))[:6]:
            num = (loss_at(k, idx, 1e-6) - loss_at(k, idx, -1e-6)) / 2e-6
            assert g[idx] == pytest.approx(num, rel=1e-4, abs=1e-7), (k, idx)


@pytest.mark.parametrize("name", ["softmax", "mlp"])
def test_numpy_models_learn_digits_and_are_deterministic(name: str) -> None:
    train, test = digits()
    accs = []
    for _ in range(2):
        m = create_model(name, num_features=64, num_classes=10, seed=3)
        m.fit(train.x, train.y, epochs=5, batch_size=16, lr=0.1, rng=np.random.default_rng(0))
        accs.append(evaluate(m, test.x, test.y)[1])
        assert all(v.dtype == np.float32 for v in m.get_weights().values())
    assert accs[0] == accs[1] > 0.9


def test_flatten_unflatten_roundtrip() -> None:
    w = create_model("mlp", num_features=4, num_classes=3, hidden=2).get_weights()
    v = flatten(w)
    assert v.size == sum(t.size for t in w.values())
    back = unflatten(v, w)
    for k in w:
        np.testing.assert_array_equal(back[k], w[k])
    with pytest.raises(ValueError):
        unflatten(v[:-1], w)


def test_set_weights_checks_layout() -> None:
    m = create_model("softmax", num_features=4, num_classes=3)
    with pytest.raises(ValueError):
        m.set_weights({"W": np.zeros((3, 4), np.float32), "b": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="unknown model"):
        create_model("resnet", num_features=4, num_classes=3)


def test_dirichlet_split_partitions_and_skews() -> None:
    train, _ = digits()
    parts = dirichlet_split(train.y, 20, 0.5, np.random.default_rng(0))
    allidx = np.concatenate(parts)
    assert len(parts) == 20 and sorted(allidx.tolist()) == list(range(len(train)))
    assert min(len(p) for p in parts) >= 10
    # non-IID: the average agent's majority class is far above the IID 10%
    majority = np.mean([np.bincount(train.y[p], minlength=10).max() / len(p) for p in parts])
    assert majority > 0.3
    iid = dirichlet_split(train.y, 20, 1000.0, np.random.default_rng(0))
    assert np.mean([np.bincount(train.y[p], minlength=10).max() / len(p) for p in iid]) < majority


def test_load_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = Dataset(np.ones((3, 4), np.float32), np.array([0, 1, 2]))
    save_npz(tmp_path / "d.npz", d)
    assert len(load_source(str(tmp_path / "d.npz"))) == 3
    folder = tmp_path / "f"
    folder.mkdir()
    np.save(folder / "x.npy", np.ones((2, 2, 2)))
    np.save(folder / "y.npy", np.array([1, 0]))
    assert load_source(str(folder)).x.shape == (2, 4)
    (tmp_path / "mydata.py").write_text("import numpy as np\ndef load():\n    return np.zeros((5, 3)), np.arange(5)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert len(load_source("mydata:load")) == 5
    assert len(load_source("builtin:digits-test")) == 360
    _npz_with_object_array(tmp_path / "pickled.npz")
    with pytest.raises(ValueError, match="allow_pickle"):
        load_source(str(tmp_path / "pickled.npz"))  # object arrays need pickle: refused
    np.savez(tmp_path / "other.npz", a=np.zeros(1))
    with pytest.raises(ValueError, match="must hold arrays named x and y"):
        load_source(str(tmp_path / "other.npz"))
    sys.modules.pop("mydata", None)


def _npz_with_object_array(path: Path) -> None:
    """An .npz whose ``x`` declares an object dtype, as ``np.savez`` writes for a pickled array.

    Written by hand, header and a body that is not even a pickle: the loader must refuse the
    dtype before it reads a byte of the body, and this test never makes a real pickle.
    """
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|O", "fortran_order": False, "shape": (1,)})
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x.npy", header.getvalue() + b"not a pickle")  # the header includes the magic
        buf = io.BytesIO()
        np.save(buf, np.array([0]))
        z.writestr("y.npy", buf.getvalue())


@pytest.mark.torch
@pytest.mark.skipif(not HAS_TORCH, reason="torch extra not installed")
def test_torch_cnns_shapes_and_training() -> None:
    train, test = digits()
    m = create_model("digits-cnn", num_features=64, num_classes=10, seed=0)
    before = evaluate(m, test.x, test.y)[1]
    m.fit(train.x, train.y, epochs=4, batch_size=16, lr=0.05, rng=np.random.default_rng(0))
    assert evaluate(m, test.x, test.y)[1] > max(0.8, before)
    med = create_model("med-cnn", num_features=784, num_classes=10)
    shapes = {k: v.shape for k, v in med.get_weights().items()}
    assert shapes["0.weight"] == (32, 1, 3, 3) and shapes["3.weight"] == (64, 32, 3, 3)
    assert shapes["7.weight"] == (64, 1600) and shapes["9.weight"] == (10, 64)
    p = med.predict_proba(np.random.default_rng(0).random((3, 784), dtype=np.float32))
    assert p.shape == (3, 10) and np.allclose(p.sum(axis=1), 1, atol=1e-5)
    with pytest.raises(ValueError, match="features"):
        create_model("med-cnn", num_features=64, num_classes=10)


@pytest.mark.onnx
@pytest.mark.skipif(not HAS_ONNX, reason="onnx extra not installed")
@pytest.mark.parametrize("name", ["softmax", "mlp", *(["digits-cnn"] if HAS_TORCH else [])])
def test_onnx_export_matches_the_model(name: str, tmp_path: Path) -> None:
    from models.onnx_export import OnnxPredictor, export_onnx

    train, test = digits()
    m = create_model(name, num_features=64, num_classes=10, seed=0)
    m.fit(train.x[:200], train.y[:200], epochs=1, batch_size=32, lr=0.05, rng=np.random.default_rng(0))
    path = export_onnx(name, m.get_weights(), tmp_path / "m.onnx", num_features=64, num_classes=10, version=7)
    assert not list(tmp_path.glob("*.data")), "weights must be embedded in the one file"
    pred = OnnxPredictor(path)
    assert pred.version == 7
    np.testing.assert_allclose(pred.predict_proba(test.x), m.predict_proba(test.x), atol=1e-5)
