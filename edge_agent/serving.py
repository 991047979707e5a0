"""Keep an ONNX copy of the newest global model on the device, for inference without torch.

``fedmq agent --onnx-out model.onnx`` writes every new global version (atomically: a
reader never sees a half-written file); ``fedmq predict model.onnx data.npz`` or
:class:`models.onnx_export.OnnxPredictor` serve predictions from it with onnxruntime.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from fedmq.messages import ModelMessage

log = logging.getLogger("fedmq.agent")


class OnnxExporter:
    """Writes each newer global model version to ``path`` as ONNX (needs the ``onnx`` package)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.version = -1

    def __call__(self, model: ModelMessage) -> None:
        """Export ``model`` if it is newer than the last export (blocking; run in a thread)."""
        if model.version <= self.version:
            return
        from models.onnx_export import export_onnx

        tmp = self.path.with_name(f".{self.path.name}.tmp")
        spec = model.model
        export_onnx(
            spec.name,
            model.tensors,
            tmp,
            num_features=spec.num_features,
            num_classes=spec.num_classes,
            hidden=spec.hidden,
            version=model.version,
            labels=spec.labels,
        )
        os.replace(tmp, self.path)
        self.version = model.version
        log.info("exported global model version %d to %s", model.version, self.path)
