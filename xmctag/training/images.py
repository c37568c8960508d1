"""Image fusion at training time: where the image cache lives, and the image inputs of each item set. (Which vision
model, ``vision = "auto"`` included, is settled with the other settings in ``xmctag.training.settings``.)

- ``image_cache_dir(config, out)``: ``config.image_cache_dir``, else ``<run dir>/image_cache``. Point several runs
  (a nightly retraining) at one directory with ``--cache-dir`` and each picture is embedded once, ever.
- ``prepare_images(...)``: loads the frozen vision encoder, embeds every not-yet-cached image of the train / dev /
  label sets into the cache (a broken or missing image is counted, never fatal) and returns each set's
  ``ImageInputs`` (features + mask per row) with a ``fusion`` description that the run saves as ``fusion.json``.
  When no training product has a usable image, fusion would learn nothing: with ``vision = "auto"`` the run goes on
  text only (with a warning), a vision model named explicitly is an error.
- ``prepare_fusion(config, data, out, ...)``: the same for a run's ``TrainingData``, saving ``fusion.json``.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from xmctag.config import Config
from xmctag.errors import UserError
from xmctag.models.image_inputs import ImageInputs
from xmctag.progress import Progress
from xmctag.run_dir import CONFIG, IMAGE_CACHE, save_fusion

ROWS_PER_BATCH = 512  # image values resolved (read, hashed, looked up, embedded if new) at a time


def image_cache_dir(config: Config, out: Path) -> Path:
    return Path(config.image_cache_dir).expanduser() if config.image_cache_dir else out / IMAGE_CACHE


def prepare_images(config: Config, out: Path, sets: dict[str, tuple[Path, list[Any] | None]], device,
                   show: Progress, explicit: bool = True,
                   image_hosts: Sequence[str] = ()) -> tuple[dict | None, dict[str, ImageInputs | None]]:
    """``sets``: name -> (file, image values per kept row, or None) -> (fusion description, name -> ``ImageInputs``).

    Relative image paths resolve against each file's directory, as ``xmctag embed-images`` does. ``sets["train"]``
    comes first; if none of its products has a usable image: ``(None, {})`` with a warning, or with ``explicit``
    (``vision`` named by the user, not "auto") a ``UserError``. ``image_hosts``: the non-public hosts and networks
    that image URLs may reach (``FetchOptions.allowed_hosts``).
    """
    from xmctag.vision.encoders import load_vision_encoder
    from xmctag.vision.images import FetchOptions
    from xmctag.vision.onnx_export import ExportedVisionEncoder

    encoder = load_vision_encoder(config.vision, device=str(device))
    if device.type == "cpu":  # ONNX Runtime embeds EfficientNet-Lite0 about 5x faster than PyTorch eager there
        encoder = ExportedVisionEncoder(encoder)
    cache_dir = image_cache_dir(config, out)
    fusion = {"vision": config.vision, "model_id": encoder.model_id, "dim": int(encoder.dim),
              "image_col": config.image_col, "max_images": config.max_images,
              "cache_dir": str(cache_dir.resolve()), "images": {}}
    inputs: dict[str, ImageInputs | None] = {}
    # One for the run: after enough network failures in a row, URLs are not fetched.
    options = FetchOptions(allowed_hosts=tuple(image_hosts))
    for name, (path, values) in sets.items():
        if values is None:
            inputs[name] = None
            continue
        inputs[name], summary = embed_values(values, Path(path).parent, encoder, cache_dir, config.max_images, show,
                                             name, options)
        fusion["images"][name] = {"products": summary.products, "with_image": summary.products_with_image,
                                  "images": summary.images, "ok": summary.images_ok, "cached": summary.cache_hits,
                                  "newly_embedded": summary.newly_embedded, "failures": summary.failures}
        if name == "train" and not summary.products_with_image:
            _no_usable_image(path, config, summary, explicit)
            return None, {}
    return fusion, inputs


def _no_usable_image(path: Path, config: Config, summary, explicit: bool) -> None:
    """No training product has a usable image: an image token would carry nothing but noise."""
    example = next((e[0] for e in summary.examples.values() if e), None)
    problem = (f"{path}: none of the {summary.products} training products has a usable image in column "
               f"{config.image_col!r}" + (f" (e.g. {example})" if example else ""))
    if explicit:
        raise UserError(f"{problem}; fix the images or train text only with --vision none")
    warnings.warn(f"{problem}; training text only (vision none)", stacklevel=3)


def embed_values(values: list[Any], base_dir: Path, encoder, cache_dir: Path, max_images: int, show: Progress,
                 name: str, options=None):
    """Image values of N items -> (``ImageInputs`` (N, max_images, dim), ``ImageEmbedSummary``), caching new ones.
    ``options``: the ``FetchOptions`` of the run."""
    from xmctag.vision.embed import ImageEmbedSummary, ImageFeatures

    started = time.perf_counter()
    reader = ImageFeatures(cache_dir, encoder.model_id, encoder.dim, base_dir, max_images)
    summary = ImageEmbedSummary(encoder.model_id)
    features = np.zeros((len(values), max_images, encoder.dim), dtype=np.float32)
    mask = np.zeros((len(values), max_images), dtype=np.float32)
    with show.task(f"{name} images", total=len(values), unit="products") as update:
        for start in range(0, len(values), ROWS_PER_BATCH):
            part = values[start:start + ROWS_PER_BATCH]
            features[start:start + len(part)], mask[start:start + len(part)] = reader.embed_batch(
                part, encoder, summary, row0=start, options=options)
            update(len(part))
    summary.seconds = time.perf_counter() - started
    for line in summary.lines():
        show.log(f"{name} images: {line}")
    return ImageInputs(features, mask), summary


def prepare_fusion(config: Config, data, out: Path, device, show: Progress, explicit: bool,
                   image_hosts: Sequence[str] = ()):
    """Image fusion for a run: embeds the images of ``data`` (a ``TrainingData``) and sets its ``*_images``.

    Returns ``(config, fusion)``: ``fusion`` as ``prepare_images`` gives it (saved as ``fusion.json``), or None for a
    text-only run; ``config`` falls back to ``vision = "none"`` (saved) when no training product has a usable image.
    """
    if config.vision == "none":
        return config, None
    paths = data.paths
    fusion, images = prepare_images(config, out, {
        "train": (paths["train"], data.train.images),
        "dev": (paths["dev"] or paths["train"], data.dev.images if data.dev is not None else None),
        "labels": (paths["labels"], data.labels.images)}, device, show, explicit=explicit, image_hosts=image_hosts)
    if fusion is None:  # vision "auto", and no training product has a usable image
        config = dataclasses.replace(config, vision="none")
        config.save(out / CONFIG)  # text only, as export and tagging will read it
        return config, None
    data.train_images, data.dev_images, data.label_images = images["train"], images["dev"], images["labels"]
    save_fusion(out, fusion)  # before the encoder is saved: loading a run reads it
    return config, fusion
