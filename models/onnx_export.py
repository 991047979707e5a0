"""ONNX export of a global model version, and an onnxruntime inference path without torch.

numpy models are written directly as an ONNX graph (``onnx.helper``), so exporting needs
neither torch nor a trace; torch models go through ``torch.onnx.export`` with weights
embedded in the one file. :class:`OnnxPredictor` needs only ``onnxruntime`` and numpy,
so an agent can serve predictions of the newest global model on a device without torch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from models.registry import TORCH_MODELS, create_model

OPSET = 17


def _numpy_graph(name: str, weights: Mapping[str, npt.NDArray[Any]]) -> Any:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.asarray(v, dtype=np.float32), k) for k, v in sorted(weights.items())]
    if name == "softmax":
        num_features, num_classes = weights["W"].shape
        nodes = [helper.make_node("MatMul", ["input", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["logits"])]
    elif name == "mlp":
        num_features = weights["W1"].shape[0]
        num_classes = weights["W2"].shape[1]
        nodes = [
            helper.make_node("MatMul", ["input", "W1"], ["h0"]),
            helper.make_node("Add", ["h0", "b1"], ["h1"]),
            helper.make_node("Relu", ["h1"], ["h"]),
            helper.make_node("MatMul", ["h", "W2"], ["o0"]),
            helper.make_node("Add", ["o0", "b2"], ["logits"]),
        ]
    else:
        raise ValueError(f"no numpy graph for model {name!r}")
    nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1))
    graph = helper.make_graph(
        nodes,
        f"fedmq-{name}",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", num_features])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", num_classes])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="fedmq")
    onnx.checker.check_model(model)
    return model


def export_onnx(
    model_name: str,
    weights: Mapping[str, npt.NDArray[Any]],
    path: str | Path,
    *,
    num_features: int,
    num_classes: int,
    hidden: int = 64,
    version: int | None = None,
    labels: tuple[str, ...] = (),
) -> Path:
    """Write global-model ``weights`` of ``model_name`` to one self-contained ONNX file.

    The graph takes ``input`` of shape ``(batch, num_features)`` float32 and returns
    ``probabilities``. ``version``, the model's name and the class ``labels`` (a JSON list)
    are stored in the model's metadata.
    """
    import onnx

    path = Path(path)
    if model_name in TORCH_MODELS:
        import torch

        from models.torch_backend import TorchModel

        model = create_model(model_name, num_features=num_features, num_classes=num_classes, hidden=hidden)
        assert isinstance(model, TorchModel)
        model.set_weights(weights)
        module = torch.nn.Sequential(
            torch.nn.Unflatten(1, TORCH_MODELS[model_name]), model.module, torch.nn.Softmax(dim=1)
        )
        module.eval()
        example = torch.zeros(1, num_features)
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=["input"],
            output_names=["probabilities"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            opset_version=18,
            external_data=False,
            dynamo=True,
        )
        proto = onnx.load(str(path))
    else:
        proto = _numpy_graph(model_name, weights)
    props = {"fedmq.model": model_name}
    if version is not None:
        props["fedmq.version"] = str(version)
    if labels:
        props["fedmq.labels"] = json.dumps(list(labels))
    onnx.helper.set_model_props(proto, props)
    onnx.save(proto, str(path))
    return path


class OnnxPredictor:
    """Inference on an exported model with onnxruntime only (no torch)."""

    def __init__(self, path: str | Path, threads: int = 1) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        self.version = int(meta["fedmq.version"]) if "fedmq.version" in meta else None
        self.model_name = meta.get("fedmq.model")
        labels = json.loads(meta["fedmq.labels"]) if "fedmq.labels" in meta else []
        self.labels: tuple[str, ...] = tuple(str(x) for x in labels) if isinstance(labels, list) else ()
        self.num_features = int(self.session.get_inputs()[0].shape[1])

    def predict_proba(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Class probabilities for a batch of flattened inputs."""
        out = self.session.run(["probabilities"], {"input": np.ascontiguousarray(x, dtype=np.float32)})
        return np.asarray(out[0], dtype=np.float32)

    def predict(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.int64]:
        """Predicted classes."""
        labels: npt.NDArray[np.int64] = np.argmax(self.predict_proba(x), axis=1).astype(np.int64)
        return labels
