"""Embedding a catalog's images into the cache, and reading a batch's image features back from it.

- ``embed_images``: streams a Parquet catalog in row batches (memory stays bounded), reads or fetches each product's
  images, and embeds only the pictures whose (content sha256, model id) is not cached yet. It is the only step that
  touches the network; it also records which content every URL / file had (``SourceIndex``), and it never stops for a
  bad image: each is counted by reason in the returned ``ImageEmbedSummary``.
- ``ImageFeatures``: what training and tagging consume. For a batch of image-column values it returns
  ``(B, max_images, dim)`` float32 features and a ``(B, max_images)`` 0/1 mask, from the cache only (no fetching);
  the mask is 0 for empty slots and for images that are missing, broken or were never embedded.
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from xmctag.errors import UserError, first_line
from xmctag.progress import Progress
from xmctag.vision import images as img
from xmctag.vision.cache import EmbeddingCache, SourceIndex, check_cache_dir, default_cache_dir
from xmctag.vision.registry import DEFAULT_VISION_ENCODER

if TYPE_CHECKING:  # torch is imported only when a PyTorch encoder is loaded (tagging may pass an ONNX one)
    from xmctag.vision.encoders import VisionEncoder

MAX_EXAMPLES = 5  # failing images named per reason in the summary


@dataclass
class ImageEmbedSummary:
    """Counts of one ``embed_images`` run. Image counts are per image slot (a product may have several)."""

    model_id: str
    products: int = 0
    products_with_image: int = 0  # at least one usable image
    images: int = 0  # non-null image values seen
    images_ok: int = 0  # usable: cached before, or embedded now
    cache_hits: int = 0  # usable images whose embedding was already cached (fetched or not)
    newly_embedded: int = 0  # distinct pictures embedded in this run
    failures: dict[str, int] = field(default_factory=dict)  # reason category -> images
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason category -> "row N: source: reason"
    seconds: float = 0.0

    def add_failure(self, row: int, slot: img.LoadedImage) -> None:
        category = img.reason_category(slot.status)
        self.failures[category] = self.failures.get(category, 0) + 1
        examples = self.examples.setdefault(category, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append(f"row {row}: {slot.source.ref[:200]}: {slot.status}")

    def lines(self) -> list[str]:
        """A human summary, one line per fact."""
        out = [f"{self.products} products, {self.products_with_image} with a usable image; {self.images} images: "
               f"{self.images_ok} ok ({self.cache_hits} cached, {self.newly_embedded} newly embedded) "
               f"in {self.seconds:.1f}s"]
        for category, count in sorted(self.failures.items()):
            out.append(f"{count} images {category}, e.g. {self.examples[category][0]}")
        return out


def embed_images(
    catalog_path: str | Path,
    image_col: str = "image",
    encoder: str | VisionEncoder = DEFAULT_VISION_ENCODER,
    cache_dir: str | Path | None = None,
    max_images: int = 1,
    batch_size: int = 32,
    workers: int = 16,
    rows_per_batch: int = 512,
    fetch: img.FetchOptions | None = None,
    refetch: bool = False,
    progress: bool = False,
    image_hosts: Sequence[str] = (),
) -> ImageEmbedSummary:
    """Embeds the images of a Parquet catalog into the cache; returns what it saw.

    ``encoder``: a name for ``load_vision_encoder``, a loaded ``VisionEncoder`` or an ``OnnxVisionEncoder`` (anything
    with ``model_id``, ``dim`` and ``embed(pictures, batch_size)``). ``batch_size``: pictures per forward pass.
    ``workers``: threads that read, fetch and decode (``fetch``: timeout, retries, ...; its ``workers`` wins when
    given). ``image_hosts``: hosts, addresses and CIDR networks that image URLs may reach although they are not
    public (added to ``fetch.allowed_hosts``; by default URLs reach public addresses only, see
    ``xmctag.vision.netguard``). ``refetch=False`` trusts the content recorded for a URL or unchanged file on an
    earlier run when its embedding is cached (no download); ``True`` reads every source again (pictures whose
    content changed behind the same URL are then re-embedded). A catalog whose image values are all unusable (none
    ok out of N > 0: the wrong column, no network) is a ``UserError`` after the run, naming the column and an
    example.
    """
    import pyarrow.parquet as pq

    start = time.perf_counter()
    path = Path(catalog_path)
    if max_images < 1:
        raise UserError("max_images must be >= 1")
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, ValueError) as e:  # pyarrow raises ArrowInvalid (a ValueError) for a non-Parquet file
        raise UserError(f"{path}: not a readable Parquet file ({first_line(e)})") from None
    if image_col not in parquet.schema_arrow.names:
        raise UserError(f"{path}: missing image column {image_col!r} (has: {', '.join(parquet.schema_arrow.names)})")
    check_cache_dir(cache_dir if cache_dir is not None else default_cache_dir(),
                    "--cache-dir" if cache_dir is not None else "image cache")
    # A gate of its own: a network given up on in an earlier run is tried again.
    options = dataclasses.replace(fetch, gate=img.NetworkGate()) if fetch else img.FetchOptions(workers=workers)
    options = dataclasses.replace(options, allowed_hosts=options.allowed_hosts + tuple(image_hosts))
    if isinstance(encoder, str):
        from xmctag.vision.encoders import load_vision_encoder
        from xmctag.vision.onnx_export import ExportedVisionEncoder

        encoder = ExportedVisionEncoder(load_vision_encoder(encoder))  # CPU: ONNX Runtime, ~5x PyTorch eager
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache = EmbeddingCache(cache_dir, encoder.model_id, encoder.dim)
    sources = SourceIndex(cache_dir)
    summary = ImageEmbedSummary(encoder.model_id)
    show = Progress(progress)
    row0 = 0
    with show.task("images", total=parquet.metadata.num_rows, unit="products") as update:
        for batch in parquet.iter_batches(batch_size=rows_per_batch, columns=[image_col]):
            values = batch.column(0).to_pylist()
            _embed_batch(values, path.parent, row0, encoder, cache, sources, max_images, batch_size, options,
                         refetch, summary)
            row0 += len(values)
            update(len(values))
    summary.seconds = time.perf_counter() - start
    for line in summary.lines():
        show.log(line)
    if summary.images and not summary.images_ok:
        category = max(summary.failures, key=summary.failures.get)
        raise UserError(f"{path}: none of the {summary.images} values of column {image_col!r} is a usable image "
                        f"(e.g. {summary.examples[category][0]}); is {image_col!r} the image column?")
    return summary


def _embed_batch(values: list[Any], base_dir: Path, row0: int, encoder: VisionEncoder, cache: EmbeddingCache,
                 sources: SourceIndex, max_images: int, batch_size: int, options: img.FetchOptions, refetch: bool,
                 summary: ImageEmbedSummary) -> None:
    known = {} if refetch else _known_sources(values, base_dir, max_images, cache, sources)
    products = img.load_images(values, base_dir, max_images, decode=False, options=options,
                               known=lambda s: known.get((s.kind, s.ref)))
    slots = [(row0 + i, slot) for i, product in enumerate(products) for slot in product.slots]
    fresh = {slot.sha256: slot for _, slot in slots if slot.ok and slot.data is not None}  # read in this run
    cached = cache.contains(list(fresh)) if fresh else np.zeros(0, dtype=bool)
    to_embed = [slot for slot, hit in zip(fresh.values(), cached) if not hit]
    _embed_new(to_embed, encoder, cache, batch_size, options.workers)
    broken = {slot.sha256: slot.status for slot in to_embed if not slot.ok}
    newly = {slot.sha256 for slot in to_embed if slot.ok}

    record: dict[str, str | None] = {}  # source key -> content sha256 (None: unusable)
    for row, slot in slots:
        if slot.ok and slot.sha256 in broken:  # another product's copy of the same bytes failed to decode
            slot.status = broken[slot.sha256]
        summary.images += 1
        if slot.ok:
            summary.images_ok += 1
            summary.cache_hits += slot.sha256 not in newly
        else:
            summary.add_failure(row, slot)
        # Read in this run (not skipped for want of a network): remember what the source held.
        if slot.data is not None or (not slot.ok and slot.status != img.NETWORK_SKIPPED):
            key = slot.source.key()
            if key is not None:
                record[key] = slot.sha256 if slot.ok else None
    summary.newly_embedded += len(newly)
    summary.products += len(products)
    summary.products_with_image += sum(any(s.ok for s in p.slots) for p in products)
    if record:
        sources.record(list(record), list(record.values()))


def _known_sources(values: list[Any], base_dir: Path, max_images: int, cache: EmbeddingCache,
                   sources: SourceIndex) -> dict[tuple[str, str], str]:
    """``(kind, ref) -> sha256`` of the URLs / unchanged files whose recorded content is already embedded."""
    refs, keys = [], []
    seen = set()
    for value in values:
        for source in img.sources_of(value, base_dir, max_images):
            if source.kind in ("file", "url") and (source.kind, source.ref) not in seen:
                seen.add((source.kind, source.ref))
                key = source.key()
                if key is not None:
                    refs.append((source.kind, source.ref))
                    keys.append(key)
    if not keys:
        return {}
    shas = sources.lookup(keys)
    candidates = [(ref, sha) for ref, sha in zip(refs, shas) if sha is not None]
    if not candidates:
        return {}
    embedded = cache.contains([sha for _, sha in candidates])
    return {ref: sha for (ref, sha), ok in zip(candidates, embedded) if ok}


def _embed_new(slots: list[img.LoadedImage], encoder: VisionEncoder, cache: EmbeddingCache, batch_size: int,
               workers: int) -> None:
    """Decodes and embeds ``slots`` (distinct contents), adds them to the cache; undecodable ones get that status.

    Pictures are decoded a few forward passes' worth at a time (a decoded photo takes megabytes), and the batch's
    embeddings go to the cache as one shard (an interrupted run loses at most this batch).
    """
    if not slots:
        return
    shas, vectors = [], []
    chunk = batch_size * 4
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, len(slots), chunk):
            part = slots[start:start + chunk]
            good = []
            for slot, picture in zip(part, pool.map(lambda s: img.decode_image(s.data), part)):
                if picture is None:
                    slot.status = img.UNDECODABLE
                else:
                    good.append((slot, picture))
            if good:
                vectors.append(encoder.embed([p for _, p in good], batch_size=batch_size))
                shas.extend(s.sha256 for s, _ in good)
    if shas:
        cache.add(shas, np.concatenate(vectors))


class ImageFeatures:
    """Cached image features for batches of products (no fetching): what training and tagging read.

    ``ImageFeatures(cache_dir, model_id, dim, base_dir, max_images)``; ``batch(values)`` -> ``(features (B, M, dim)
    float32, mask (B, M) float32 0/1)`` with ``M = max_images``. ``base_dir`` resolves relative paths, as for
    ``embed_images`` (the catalog's directory).
    """

    def __init__(self, cache_dir: str | Path, model_id: str, dim: int, base_dir: str | Path, max_images: int = 1):
        self.cache = EmbeddingCache(cache_dir, model_id, dim)
        self.sources = SourceIndex(cache_dir)
        self.base_dir = Path(base_dir)
        self.max_images = max_images
        self.dim = int(dim)

    def embed_batch(self, values: Sequence[Any], encoder: VisionEncoder, summary: ImageEmbedSummary, row0: int = 0,
                    batch_size: int = 32, options: img.FetchOptions | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``batch(values)`` after embedding the images of ``values`` not cached yet (counted in ``summary``).

        For training and tagging, which see each catalog batch once: reading, decoding (in ``options.workers``
        threads) and embedding happen only for pictures whose embedding is missing; ``encoder`` must be the cache's
        model (same ``model_id``). Row numbers in the summary's examples start at ``row0``.
        """
        if encoder.model_id != self.cache.model_id:
            raise ValueError(f"encoder {encoder.model_id} does not match the cache's model {self.cache.model_id}")
        values = list(values)
        _embed_batch(values, self.base_dir, row0, encoder, self.cache, self.sources, self.max_images, batch_size,
                     options or img.FetchOptions(), False, summary)
        return self.batch(values)

    def batch(self, values: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
        import hashlib

        positions, shas, lookups = [], [], []  # lookups: (index into shas, source key) to resolve via SourceIndex
        for b, value in enumerate(values):
            for m, source in enumerate(img.sources_of(value, self.base_dir, self.max_images)):
                if source.kind == "bytes":
                    positions.append((b, m))
                    shas.append(hashlib.sha256(source.data).hexdigest())
                elif source.kind in ("file", "url"):
                    key = source.key()
                    if key is not None:
                        positions.append((b, m))
                        shas.append(None)
                        lookups.append((len(shas) - 1, key))
        if lookups:
            for (index, _), sha in zip(lookups, self.sources.lookup([k for _, k in lookups])):
                shas[index] = sha
        features = np.zeros((len(values), self.max_images, self.dim), dtype=np.float32)
        mask = np.zeros((len(values), self.max_images), dtype=np.float32)
        usable = [i for i, sha in enumerate(shas) if sha is not None]
        if usable:
            vectors, found = self.cache.lookup([shas[i] for i in usable])
            for i, vector, ok in zip(usable, vectors, found):
                if ok:
                    b, m = positions[i]
                    features[b, m] = vector
                    mask[b, m] = 1.0
        return features, mask
