"""The vision encoders' ONNX graphs (``vision.onnx``, ``vision.fp16.onnx``, ``vision.json``), checked against PyTorch.

Graph contract: input ``pixel_values`` float32 ``(batch, 3, H, W)`` (what ``encoder.preprocess`` returns; H and W
fixed, batch dynamic), output ``image_embedding`` float32 ``(batch, dim)``: the encoder's raw pooled features, not
normalised (the same numbers ``encoder.embed`` puts in the cache).

Files: ``vision.json`` (model id, dim, preprocessing spec, parity: what ``OnnxVisionEncoder`` needs to run the graph
without torch), ``vision.onnx`` (fp32, CPU) and ``vision.fp16.onnx`` (fp16 weights and activations, fp32 inputs and
outputs, meant for a GPU). Exported, converted and checked with ``xmctag.backend`` (the same tools as the text
encoder): every graph is run with ONNX Runtime on the same pictures as the PyTorch encoder, at batch sizes 1 and N,
and must stay within the backend's tolerances on L2-normalised features; a violation raises ``ParityError`` and
leaves no graph file behind.

``ExportedVisionEncoder``: a PyTorch vision encoder that embeds through its own fp32 export (faster on CPU).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from xmctag.backend import parity
from xmctag.backend.export import export_torch_graph
from xmctag.backend.optimise import to_fp16
from xmctag.vision.encoders import VisionEncoder, describe
from xmctag.vision.onnx_runtime import INPUT_NAME, ONNX_FP16, ONNX_FP32, OUTPUT_NAME, VISION_META

ParityError = parity.ParityError


def parity_pictures(n: int = 8, seed: int = 0) -> list:
    """Synthetic test pictures of various sizes: solid colours, gradients, noise (when no real images are given)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    pictures = []
    for i in range(n):
        height, width = int(rng.integers(24, 320)), int(rng.integers(24, 320))
        kind = i % 3
        if kind == 0:
            array = np.broadcast_to(rng.integers(0, 256, 3, dtype=np.uint8), (height, width, 3))
        elif kind == 1:
            ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
            array = (ramp * rng.random(3, dtype=np.float32) + rng.integers(0, 64)).clip(0, 255)
            array = np.broadcast_to(array, (height, width, 3)).astype(np.uint8)
        else:
            array = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        pictures.append(Image.fromarray(np.ascontiguousarray(array)))
    return pictures


def export_vision_onnx(encoder: VisionEncoder, out_dir: str | Path, fp16: bool = True,
                       pictures: Sequence | None = None, fp32_tolerance: float | None = None,
                       fp16_tolerance: float | None = None) -> dict:
    """Writes ``vision.onnx`` (and ``vision.fp16.onnx``) and ``vision.json`` into ``out_dir``; returns the parity.

    ``pictures``: RGB pictures to check parity on (real product images are best); synthetic ones by default.
    Raises ``ParityError`` (nothing written) when a graph is off by more than its tolerance.
    """
    import torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pixels = encoder.preprocess(list(pictures) if pictures is not None else parity_pictures())
    encoder = encoder.eval()
    device = encoder.device
    encoder.to("cpu")
    # Graphs are written under their final names in a staging folder (a large graph's side file ``<name>.data``
    # is referenced by name), checked there, then moved into ``out_dir``.
    staging = Path(tempfile.mkdtemp(prefix=".vision-export.", dir=out_dir))
    try:
        with torch.no_grad():
            expected = encoder(pixels).float().numpy()
            export_torch_graph(encoder, pixels[:2], staging / ONNX_FP32, INPUT_NAME, OUTPUT_NAME)
        if fp16:
            to_fp16(staging / ONNX_FP32, staging / ONNX_FP16)
        results = {"rows": len(pixels), "metric": "max abs diff of L2-normalised features (raw: not normalised)"}
        tolerances = {ONNX_FP32: parity.FP32_TOLERANCE if fp32_tolerance is None else fp32_tolerance,
                      ONNX_FP16: parity.FP16_TOLERANCE if fp16_tolerance is None else fp16_tolerance}
        for name in [ONNX_FP32] + ([ONNX_FP16] if fp16 else []):
            raw, normalised = parity.vision_graph_difference(staging / name, pixels.numpy(), expected, INPUT_NAME,
                                                             OUTPUT_NAME)
            results[name] = {"normalised": normalised, "raw": raw, "tolerance": tolerances[name]}
            if not normalised <= tolerances[name]:
                raise ParityError(f"vision encoder export failed the parity check: {name} differs from PyTorch by "
                                  f"{normalised:.3g} (max abs on L2-normalised features; raw {raw:.3g}; tolerance "
                                  f"{tolerances[name]:g}) for {encoder.model_id}; nothing written")
        (staging / VISION_META).write_text(json.dumps(dict(describe(encoder), parity=results), indent=2) + "\n")
        for name in [ONNX_FP32] + ([ONNX_FP16] if fp16 else []) + [VISION_META]:
            for file in (name, name + ".data"):
                if (staging / file).exists():
                    os.replace(staging / file, out_dir / file)
        return results
    finally:
        encoder.to(device)
        shutil.rmtree(staging, ignore_errors=True)


class ExportedVisionEncoder:
    """A PyTorch ``VisionEncoder`` that embeds through its own fp32 ONNX export, for embedding on CPU.

    For EfficientNet-Lite0 on a CPU, ONNX Runtime embeds several times faster than PyTorch eager (bench/RESULTS.md,
    "Image fusion"), with features within the fp32 parity tolerance and the same ``model_id`` (so cache entries are
    shared). The export (a few seconds, parity-checked) happens on the first picture to embed, into a temporary
    folder removed once the session is loaded: a fully cached catalog never pays for it. Where the export or ONNX
    Runtime fails, PyTorch embeds, with a warning saying why.
    """

    def __init__(self, encoder: VisionEncoder):
        self.torch_encoder = encoder
        self.model_id, self.dim = encoder.model_id, encoder.dim
        self._onnx = None
        self._tried = False

    def embed(self, pictures: Sequence, batch_size: int = 32) -> np.ndarray:
        if not self._tried:
            self._tried = True
            self._onnx = self._export()
        return (self._onnx or self.torch_encoder).embed(pictures, batch_size)

    @property
    def runtime(self) -> str | None:
        """What embeds: None before the first picture, then ``"onnxruntime"`` or ``"torch"`` (the fallback)."""
        if not self._tried:
            return None
        return "onnxruntime" if self._onnx is not None else "torch"

    def _export(self):
        from xmctag.vision.onnx_runtime import OnnxVisionEncoder

        folder = tempfile.mkdtemp(prefix="xmctag-vision-")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the exporter's own chatter
                export_vision_onnx(self.torch_encoder, folder, fp16=False)
            return OnnxVisionEncoder(folder)  # the session holds the graph in memory from here on
        except Exception as e:  # noqa: BLE001 - any failure (no onnxruntime, an op it lacks) falls back to torch
            warnings.warn(f"{self.model_id}: embedding images with PyTorch, not ONNX Runtime "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})", stacklevel=2)
            return None
        finally:
            shutil.rmtree(folder, ignore_errors=True)
