"""Image inputs for tagging with a fused bundle: ONNX Runtime only (no torch), cache first.

``BundleImages(bundle, fusion, cache_dir, workers, image_hosts)``; ``features(values, base_dir)`` -> ``(features
(B, M, V) float32, mask (B, M) int64)`` for a batch of image-column values, the graph's ``image_embedding`` and
``image_mask``. Image URLs reach public addresses and those of ``image_hosts`` only (``xmctag.vision.netguard``).
Pictures whose embedding is cached (keyed by content sha256 + vision model id, shared with training and ``xmctag
embed-images``) are not decoded at all; the others are read and decoded by ``workers`` threads and embedded with the
bundle's ``vision.onnx`` (loaded on first need, so a fully cached catalog never loads it). A missing or broken
picture only masks its slot out; ``counts`` says how many images were used, missing (no such file), failed (could
not be fetched or read, or skipped once the network was given up on) or broken (read, but no usable picture:
undecodable, unsupported source), with the first example row of each; ``summary_lines`` words them.

``resolve_cache_dir``: ``--cache-dir`` if given, else the cache the bundle names (the training run's), else a
``xmctag-image-cache`` folder next to the output when that one is not writable (another machine, a read-only mount).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from xmctag.vision import images as img
from xmctag.vision.cache import check_cache_dir

if TYPE_CHECKING:
    from xmctag.bundle import Bundle

FALLBACK_CACHE = "xmctag-image-cache"
# ImageCounts field of each reason category (img.reason_category)
KIND_OF_FAILURE = {"missing": "missing", "fetch_failed": "failed", "skipped": "failed", "undecodable": "broken",
                   "unsupported": "broken"}


@dataclass
class ImageCounts:
    """Image slots seen while tagging (a product may have several, up to ``max_images``)."""

    used: int = 0  # usable images that went into the encoder
    missing: int = 0  # no such file
    failed: int = 0  # could not be read: fetch failed, skipped (network given up on), read error
    broken: int = 0  # read, but no usable picture: undecodable, unsupported source
    cached: int = 0  # of the used ones: embedding found in the cache
    newly_embedded: int = 0  # distinct pictures embedded with vision.onnx in this run
    products_with_image: int = 0
    examples: dict[str, str] = field(default_factory=dict)  # missing / failed / broken -> "row N: source: reason"

    def to_dict(self) -> dict:
        return {**vars(self), "examples": dict(self.examples)}


def summary_lines(counts: dict, cache_dir) -> list[str]:
    """``ImageCounts.to_dict()`` in words: the totals, then one line per kind of failure with its first example."""
    lines = [f"images: {counts['used']} used ({counts['cached']} cached, {counts['newly_embedded']} newly embedded), "
             f"{counts['missing']} missing, {counts['failed']} failed, {counts['broken']} broken; "
             f"{counts['products_with_image']} products with an image; cache {cache_dir}"]
    for kind in ("missing", "failed", "broken"):
        if counts[kind]:
            lines.append(f"images: {counts[kind]} {kind}, e.g. {counts['examples'][kind]}")
    return lines


class _LazyVisionGraph:
    """The bundle's ``vision.onnx`` as an ``embed_images`` encoder, loaded (and checked, by ``Bundle``) on the
    first picture to embed."""

    def __init__(self, bundle: Bundle, model_id: str, dim: int, device: str):
        self.bundle, self.model_id, self.dim, self.device = bundle, model_id, dim, device
        self._encoder = None

    def embed(self, pictures: Sequence, batch_size: int = 32) -> np.ndarray:
        if self._encoder is None:
            self._encoder = self.bundle.vision_encoder(self.device)
        return self._encoder.embed(pictures, batch_size)


class BundleImages:
    """See the module docstring. ``bundle``: an open ``xmctag.bundle.Bundle``; ``fusion``: its ``fusion`` section;
    ``image_hosts``: the non-public hosts and networks that image URLs may reach (``FetchOptions.allowed_hosts``)."""

    def __init__(self, bundle: Bundle, fusion: dict, cache_dir: Path, device: str = "cpu", workers: int = 8,
                 image_hosts: Sequence[str] = ()):
        from xmctag.vision.embed import ImageFeatures

        self.max_images = int(fusion["max_images"])
        self.dim = int(fusion["vision_dim"])
        self.cache_dir = cache_dir
        self.encoder = _LazyVisionGraph(bundle, fusion["model_id"], self.dim, device)
        self.options = img.FetchOptions(workers=max(1, workers), allowed_hosts=tuple(image_hosts))
        self._features = ImageFeatures(cache_dir, fusion["model_id"], self.dim, ".", self.max_images)
        self.counts = ImageCounts()
        self.slots_seen = 0  # for the images/s of the progress line

    def features(self, values: Sequence[Any], base_dir: Path, row0: int = 0) -> tuple[np.ndarray, np.ndarray]:
        from xmctag.vision.embed import ImageEmbedSummary

        self._features.base_dir = Path(base_dir)  # relative paths resolve against the catalog's directory
        summary = ImageEmbedSummary(self.encoder.model_id)
        features, mask = self._features.embed_batch(values, self.encoder, summary, row0=row0, options=self.options)
        used = int(mask.sum())
        self.counts.used += used
        self.counts.cached += summary.cache_hits
        self.counts.newly_embedded += summary.newly_embedded
        for category, n in summary.failures.items():
            kind = KIND_OF_FAILURE.get(category, "failed")
            setattr(self.counts, kind, getattr(self.counts, kind) + n)
            self.counts.examples.setdefault(kind, summary.examples[category][0])
        self.counts.products_with_image += int((mask.sum(axis=1) > 0).sum())
        self.slots_seen += summary.images
        return features, mask.astype(np.int64)


def resolve_cache_dir(requested: str | Path | None, bundle_cache: str | None, output: Path | None) -> Path:
    """``requested`` as given, else the bundle's cache if writable, else ``<output dir>/xmctag-image-cache``."""
    if requested is not None:
        check_cache_dir(Path(requested).expanduser())  # a file or a read-only place: one line, not a traceback
        return Path(requested).expanduser()
    fallback = (output.parent if output is not None else Path.cwd()) / FALLBACK_CACHE
    for candidate in ([Path(bundle_cache)] if bundle_cache else []) + [fallback]:
        if _writable(candidate):
            return candidate
    return fallback  # let the cache report what is wrong with it


def _writable(directory: Path) -> bool:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
        return os.access(directory, os.W_OK)
    except OSError:
        return False
