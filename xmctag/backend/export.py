"""PyTorch -> ONNX, for both kinds of graph a bundle holds.

- ``export_text_graph(encoder, path, fusion)``: the text encoder (``TextEncoder`` / ``FusedEncoder``: backbone +
  pooling + L2 norm) through Optimum, with a custom ``OnnxConfig`` for our wrapper. Graph contract: inputs
  ``input_ids``, ``attention_mask`` (int64, dynamic batch and sequence axes), output ``embedding`` (float32,
  ``(batch, dim)``, unit norm); with image fusion also ``image_embedding`` (float32, ``(batch, max_images,
  vision_dim)``) and ``image_mask`` (int64, ``(batch, max_images)``, 0 = no usable image in that slot).
- ``export_torch_graph(module, sample, path, input_name, output_name)``: any module with one input and one output,
  batch axis dynamic, through the TorchScript exporter (``torch.onnx.export(dynamo=False)``: the dynamo exporter
  needs ``onnxscript``, which xmctag does not depend on). The vision encoders use it.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path

from xmctag.backend.onnx_files import OPSET, load_onnx, save_onnx
from xmctag.bundle import IMAGE_INPUTS


def onnx_config_class(fusion: dict | None = None):
    """Built lazily: importing Optimum is slow and only export needs it. ``fusion``: the run's ``fusion.json``."""
    from optimum.exporters.onnx.config import TextEncoderOnnxConfig
    from optimum.utils import DummyInputGenerator, DummyTextInputGenerator, NormalizedTextConfig

    class ImageEmbeddingInputGenerator(DummyInputGenerator):
        """Dummy ``image_embedding`` ``(batch, max_images, vision_dim)`` and ``image_mask`` for tracing."""

        SUPPORTED_INPUT_NAMES = tuple(IMAGE_INPUTS)

        def __init__(self, task, normalized_config, batch_size: int = 2, **kwargs):
            self.batch_size = batch_size

        def generate(self, input_name: str, framework: str = "pt", int_dtype: str = "int64",
                     float_dtype: str = "fp32"):
            shape = [self.batch_size, fusion["max_images"]]
            if input_name == "image_embedding":
                return self.random_float_tensor(shape + [fusion["dim"]], framework=framework, dtype=float_dtype)
            return self.random_int_tensor(shape, max_value=2, min_value=0, framework=framework, dtype=int_dtype)

    class XMCEncoderOnnxConfig(TextEncoderOnnxConfig):
        """Optimum's description of our ``TextEncoder`` wrapper: ids and mask (and image inputs) in, embedding out."""

        NORMALIZED_CONFIG_CLASS = NormalizedTextConfig
        DEFAULT_ONNX_OPSET = OPSET
        DUMMY_INPUT_GENERATOR_CLASSES = (DummyTextInputGenerator,) + ((ImageEmbeddingInputGenerator,) if fusion else ())

        @property
        def inputs(self) -> dict[str, dict[int, str]]:
            axes = {0: "batch_size", 1: "sequence_length"}
            inputs = {"input_ids": dict(axes), "attention_mask": dict(axes)}
            if fusion:
                inputs.update({name: {0: "batch_size", 1: "num_images"} for name in IMAGE_INPUTS})
            return inputs

        @property
        def outputs(self) -> dict[str, dict[int, str]]:
            return {"embedding": {0: "batch_size"}}

    return XMCEncoderOnnxConfig


def export_text_graph(encoder, path: Path, fusion: dict | None = None) -> None:
    """Writes the encoder's graph to ``path`` (see the module docstring); ``fusion``: the run's ``fusion.json``."""
    from optimum.exporters.onnx import export as optimum_export

    onnx_config = onnx_config_class(fusion)(encoder.config, task="feature-extraction")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow in transformers internals
        optimum_export(model=encoder, config=onnx_config, output=path, opset=OPSET)


def export_torch_graph(module, sample, path: Path, input_name: str, output_name: str) -> None:
    """``module(sample)`` traced to ``path`` (one self-contained file, or the file + ``<name>.data`` when large)."""
    import torch

    raw = Path(tempfile.mkdtemp(prefix="raw.", dir=path.parent))  # the exporter may scatter weight files here
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python control flow inside transformers code
            axes = {input_name: {0: "batch"}, output_name: {0: "batch"}}
            torch.onnx.export(module, (sample,), str(raw / "model.onnx"), input_names=[input_name],
                              output_names=[output_name], dynamic_axes=axes, opset_version=OPSET,
                              do_constant_folding=True, dynamo=False)
        save_onnx(load_onnx(raw / "model.onnx"), path)
    finally:
        shutil.rmtree(raw, ignore_errors=True)
