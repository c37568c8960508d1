"""Image preprocessing as data: a small spec (resize, crop, scale, mean, std) applied with PIL and numpy only.

Training embeds pictures with PyTorch; tagging will run the exported ONNX graph and must not import torch or
transformers. Both preprocess through this one function, from a ``PreprocessSpec`` that a bundle can store as JSON,
so the pixels are the same on both sides. For Hugging Face models the spec is read from the image processor and
checked against it at load time (``spec_from_hf_processor``); for EfficientNet-Lite0 it is written down.

Steps, in order: resize (to an exact ``(H, W)``, aspect ignored; or the shortest edge to ``shortest_edge``, aspect
kept, as CLIP does), optional centre crop to ``crop`` (zero padding where the picture is smaller, as transformers
does), ``x * scale``, ``(x - mean) / std``, channels first. Output: float32 ``(B, 3, H, W)``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from xmctag.errors import UserError

RESAMPLE = ("nearest", "lanczos", "bilinear", "bicubic", "box", "hamming")  # PIL's numbering, 0..5


@dataclass(frozen=True)
class PreprocessSpec:
    size: tuple[int, int] | None = None  # exact resize (H, W)
    shortest_edge: int | None = None  # or: shortest edge to this, aspect kept
    crop: tuple[int, int] | None = None  # centre crop (H, W) after resizing
    resample: str = "bilinear"
    scale: float = 1 / 255
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    @property
    def output_size(self) -> tuple[int, int]:
        if self.crop is not None:
            return self.crop
        if self.size is not None:
            return self.size
        raise ValueError("a shortest-edge resize without a crop has no fixed output size")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "PreprocessSpec":
        values = dict(values)
        for key in ("size", "crop", "mean", "std"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        spec = cls(**values)
        spec.output_size  # noqa: B018 - validates that the output has a fixed size
        if spec.resample not in RESAMPLE or (spec.size is None) == (spec.shortest_edge is None):
            raise ValueError(f"bad preprocessing spec {values}")
        return spec


def preprocess(images: Sequence, spec: PreprocessSpec) -> np.ndarray:
    """RGB ``PIL.Image`` pictures -> float32 ``(B, 3, H, W)``."""
    height, width = spec.output_size
    batch = np.empty((len(images), height, width, 3), dtype=np.float32)
    for i, picture in enumerate(images):
        batch[i] = _pixels(picture, spec)
    batch *= np.float32(spec.scale)
    batch -= np.asarray(spec.mean, dtype=np.float32)
    batch /= np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))


def _pixels(picture, spec: PreprocessSpec) -> np.ndarray:
    """One picture resized and cropped: ``(H, W, 3)`` uint8."""
    picture = picture if picture.mode == "RGB" else picture.convert("RGB")
    resample = RESAMPLE.index(spec.resample)
    if spec.size is not None:
        height, width = spec.size
    else:  # transformers' get_resize_output_image_size (int() truncation included)
        w, h = picture.size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = spec.shortest_edge, int(spec.shortest_edge * long / short)
        height, width = (new_long, new_short) if w <= h else (new_short, new_long)
    if (width, height) != picture.size:
        picture = picture.resize((width, height), resample=resample, reducing_gap=None)
    array = np.asarray(picture, dtype=np.uint8)
    if spec.crop is None:
        return array
    crop_h, crop_w = spec.crop
    if height < crop_h or width < crop_w:  # pad with zeros, centred, as transformers' center_crop does
        padded = np.zeros((max(height, crop_h), max(width, crop_w), 3), dtype=np.uint8)
        top, left = -(-(padded.shape[0] - height) // 2), -(-(padded.shape[1] - width) // 2)
        padded[top:top + height, left:left + width] = array
        array, height, width = padded, padded.shape[0], padded.shape[1]
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return array[top:top + crop_h, left:left + crop_w]


def spec_from_hf_processor(processor, name: str) -> PreprocessSpec:
    """The spec of a transformers image processor (CLIP / SigLIP style); ``UserError`` if it does other things."""
    size = dict(getattr(processor, "size", None) or {})
    if not getattr(processor, "do_resize", True) or not size:
        raise UserError(f"{name}: image processors that do not resize are not supported")
    if getattr(processor, "do_pad", False):
        raise UserError(f"{name}: image processors that pad are not supported")
    resize: dict[str, Any] = {}
    if "shortest_edge" in size:
        resize["shortest_edge"] = int(size["shortest_edge"])
    elif "height" in size and "width" in size:
        resize["size"] = (int(size["height"]), int(size["width"]))
    else:
        raise UserError(f"{name}: unsupported image processor size {size}")
    crop = None
    if getattr(processor, "do_center_crop", False):
        crop_size = processor.crop_size
        crop = (int(crop_size["height"]), int(crop_size["width"]))
    if crop is None and "shortest_edge" in resize:
        raise UserError(f"{name}: a shortest-edge resize without a centre crop gives pictures of varying sizes")
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if getattr(processor, "do_normalize", True):
        mean, std = _three(processor.image_mean), _three(processor.image_std)
    scale = float(processor.rescale_factor) if getattr(processor, "do_rescale", True) else 1.0
    resample = RESAMPLE[int(getattr(processor, "resample", 2))]
    return PreprocessSpec(crop=crop, resample=resample, scale=scale, mean=mean, std=std, **resize)


def _three(values) -> tuple[float, float, float]:
    values = [float(v) for v in (values if isinstance(values, (list, tuple)) else [values])]
    return tuple(values * 3) if len(values) == 1 else tuple(values)
