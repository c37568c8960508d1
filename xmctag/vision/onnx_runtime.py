"""Running an exported vision encoder with ONNX Runtime: no torch, no transformers (what tagging will use).

``OnnxVisionEncoder(directory)`` reads ``vision.json`` (written by ``xmctag.vision.onnx_export``: model id, dim,
preprocessing spec) and ``vision.onnx`` (or ``vision.fp16.onnx`` with ``fp16=True``) and has the same ``model_id``,
``dim``, ``preprocess`` and ``embed`` as a ``VisionEncoder``, so ``embed_images`` accepts it too (on CPU it is
several times faster than PyTorch eager for EfficientNet-Lite0). The fp32 graph shares the PyTorch encoder's
``model_id`` (parity 1e-4): cache entries are interchangeable. The fp16 graph's features differ more, so its id
gets a ``+fp16`` suffix and its embeddings are cached separately.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from xmctag.errors import UnreadableFile, UserError
from xmctag.vision.preprocess import PreprocessSpec, preprocess

VISION_META = "vision.json"
ONNX_FP32 = "vision.onnx"
ONNX_FP16 = "vision.fp16.onnx"
INPUT_NAME = "pixel_values"
OUTPUT_NAME = "image_embedding"


class OnnxVisionEncoder:
    """An exported vision encoder: RGB pictures -> ``(N, dim)`` float32 features, with ONNX Runtime."""

    def __init__(self, directory: str | Path, fp16: bool = False, device: str = "cpu", threads: int | None = None):
        from xmctag.backend.runtime import create_session

        directory = Path(directory)
        try:
            meta = json.loads((directory / VISION_META).read_text())
            self.spec = PreprocessSpec.from_dict(meta["preprocess"])
            self.dim = int(meta["dim"])
            base_id = str(meta["model_id"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UnreadableFile(f"{directory}: no readable {VISION_META} ({e})", directory / VISION_META,
                                 f"{type(e).__name__}: {e}") from None
        graph = directory / (ONNX_FP16 if fp16 else ONNX_FP32)
        if not graph.is_file():
            raise UserError(f"{directory}: no {graph.name}")
        self.model_id = base_id + ("+fp16" if fp16 else "")
        self.session = create_session(graph, device, threads)

    @property
    def image_size(self) -> tuple[int, int]:
        return self.spec.output_size

    def preprocess(self, images: Sequence) -> np.ndarray:
        return preprocess(images, self.spec)

    def embed(self, images: Sequence, batch_size: int = 32) -> np.ndarray:
        out = np.zeros((len(images), self.dim), dtype=np.float32)
        for start in range(0, len(images), batch_size):
            pixels = self.preprocess(images[start:start + batch_size])
            out[start:start + len(pixels)] = self.session.run([OUTPUT_NAME], {INPUT_NAME: pixels})[0]
        return out
