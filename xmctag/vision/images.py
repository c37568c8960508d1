"""Product images: where a catalog's ``image`` column points, fetching the bytes, decoding them to RGB.

A value of the image column is one of:

- raw JPEG / PNG / WebP / ... bytes (a Binary column);
- a path, absolute or relative to the catalog file's directory;
- a ``file://`` URI;
- an ``http://`` or ``https://`` URL;
- a Hugging Face ``datasets`` image struct ``{"bytes": ..., "path": ...}`` (how ``datasets`` writes images to Parquet);
- a list of those (the first ``max_images`` non-null entries are used), or null.

``load_images`` turns a batch of such values into one ``ProductImages`` per product: for each image its content
bytes, their sha256 (the cache key, so the same picture under two URLs is embedded once) and, on request, the decoded
RGB picture. Nothing here raises for a bad image: each one carries a status, ``"ok"`` or the reason it is unusable
(``"null"``, ``"missing"``, ``"undecodable"``, ``"fetch_failed: ..."``, ``"unsupported: ..."``, ``"skipped: network
unavailable"``), for the caller to count and report. Sources are read by ``xmctag.vision.fetch`` (files, URLs:
bounded, with retries) from a bounded thread pool, where decoding runs too.
"""

from __future__ import annotations

import hashlib
import io
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from xmctag.vision.fetch import (  # noqa: F401 - re-exported: the statuses and options callers count and pass
    FETCH_FAILED,
    MISSING,
    NETWORK_FAILURES_TO_GIVE_UP,
    NETWORK_SKIPPED,
    NULL,
    OK,
    UNDECODABLE,
    UNSUPPORTED,
    FetchOptions,
    NetworkGate,
    Source,
    read_source,
)


@dataclass
class LoadedImage:
    """One image slot of a product: its source, status and, when ok, content bytes, sha256 and decoded picture."""

    source: Source
    status: str = OK
    data: bytes | None = field(default=None, repr=False)
    sha256: str | None = None  # hex digest of ``data``
    image: Any = field(default=None, repr=False)  # PIL.Image.Image in RGB, when decoded

    @property
    def ok(self) -> bool:
        return self.status == OK


@dataclass
class ProductImages:
    """The images of one product, in column order (at most ``max_images``)."""

    slots: list[LoadedImage]

    @property
    def status(self) -> str:
        """``"ok"`` if at least one image is usable, ``"null"`` if the product has none, else the first reason."""
        if not self.slots:
            return NULL
        if any(s.ok for s in self.slots):
            return OK
        return self.slots[0].status

    @property
    def images(self) -> list:
        """The decoded RGB pictures that are usable (empty unless loaded with ``decode=True``)."""
        return [s.image for s in self.slots if s.ok and s.image is not None]


def reason_category(status: str) -> str:
    """``"fetch_failed: HTTP 404"`` -> ``"fetch_failed"``: the part a summary counts by."""
    return status.split(":", 1)[0]


# ---------------------------------------------------------------------------------------------------------------
# Parsing column values


def sources_of(value: Any, base_dir: str | Path, max_images: int = 1) -> list[Source]:
    """The sources named by one column value (see the module docstring), at most ``max_images``, nulls skipped."""
    if value is None:
        return []
    if hasattr(value, "to_list"):  # a polars Series (list column read as Series)
        value = value.to_list()
    elif hasattr(value, "tolist") and not isinstance(value, (bytes, bytearray, memoryview, str)):  # numpy array
        value = value.tolist()
    if isinstance(value, dict) or not isinstance(value, (list, tuple)):
        value = [value]
    sources = []
    for item in value:
        source = _source_of_item(item, Path(base_dir))
        if source is not None:
            sources.append(source)
        if len(sources) == max_images:
            break
    return sources


def _source_of_item(item: Any, base_dir: Path) -> Source | None:
    if item is None:
        return None
    if isinstance(item, dict):  # Hugging Face datasets Image feature: prefer the embedded bytes
        if item.get("bytes") is not None:
            return _source_of_item(item["bytes"], base_dir)
        return _source_of_item(item.get("path"), base_dir)
    if isinstance(item, (bytes, bytearray, memoryview)):
        data = bytes(item)
        return Source("bytes", f"<{len(data)} bytes>", data) if data else None
    if not isinstance(item, str):
        return Source("invalid", repr(item)[:200], reason=f"{UNSUPPORTED}: value of type {type(item).__name__}")
    text = item.strip()
    if not text:
        return None
    scheme = urllib.parse.urlsplit(text).scheme.lower()
    if scheme in ("http", "https"):
        return Source("url", text)
    if scheme == "file":
        return _file_uri_source(text, base_dir)
    if len(scheme) > 1:  # s3://, gs://, data:, ... ("C:" style drive letters have a one-letter scheme)
        return Source("invalid", text, reason=f"{UNSUPPORTED}: {scheme}:// sources")
    path = Path(text).expanduser()
    return Source("file", str(path if path.is_absolute() else (base_dir / path).absolute()))


def _file_uri_source(uri: str, base_dir: Path) -> Source:
    parts = urllib.parse.urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        return Source("invalid", uri, reason=f"{UNSUPPORTED}: file URI on host {parts.netloc!r}")
    path = Path(urllib.request.url2pathname(parts.path))
    return Source("file", str(path if path.is_absolute() else (base_dir / path).absolute()))


# ---------------------------------------------------------------------------------------------------------------
# Decoding


def decode_image(data: bytes):
    """Content bytes -> RGB ``PIL.Image`` (fully decoded), or ``None`` if they are not a readable picture.

    The EXIF orientation is applied (phone photos), and transparent pixels are put on white: product shots with a
    transparent background are meant to be seen on a page, not on the black that a plain RGB conversion gives.
    """
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()  # decode now: a truncated file fails here, not later in a worker that does not expect it
            picture = ImageOps.exif_transpose(opened)
            if picture.mode in ("RGBA", "LA", "PA") or (picture.mode == "P" and "transparency" in picture.info):
                rgba = picture.convert("RGBA")
                background = Image.new("RGB", rgba.size, (255, 255, 255))
                background.paste(rgba, mask=rgba.getchannel("A"))
                return background
            return picture.convert("RGB")
    except Exception:  # noqa: BLE001 - PIL raises many types (OSError, ValueError, SyntaxError, bomb errors, ...)
        return None


# ---------------------------------------------------------------------------------------------------------------
# A batch of products


def load_images(
    values: Iterable[Any],
    base_dir: str | Path,
    max_images: int = 1,
    decode: bool = True,
    options: FetchOptions | None = None,
    known: Callable[[Source], str | None] | None = None,
) -> list[ProductImages]:
    """One ``ProductImages`` per value of the image column, in order.

    ``decode=False`` reads and hashes the bytes only (enough to look images up in a cache; ``decode_image`` them
    later). ``known(source)`` may return the sha256 that the source is already known to have: such an image is not
    read at all, and its slot is ok with ``sha256`` set and no data. A source named by several products (a
    placeholder picture) is read once.
    """
    options = options or FetchOptions()
    products = [sources_of(v, base_dir, max_images) for v in values]
    # One task per distinct file or URL, and one per inline image; all run in the pool (decoding included).
    task_of: dict[tuple[str, str] | int, int] = {}
    tasks: list[Source] = []
    for sources in products:
        for s in sources:
            key = (s.kind, s.ref) if s.kind in ("file", "url") else id(s)
            if key not in task_of:
                task_of[key] = len(tasks)
                tasks.append(s)

    def work(source: Source) -> LoadedImage:
        if known is not None:
            sha = known(source)
            if sha is not None:
                return LoadedImage(source, OK, sha256=sha)
        data, status = read_source(source, options)
        if data is None:
            return LoadedImage(source, status)
        slot = LoadedImage(source, OK, data=data, sha256=hashlib.sha256(data).hexdigest())
        if decode:
            slot.image = decode_image(data)
            if slot.image is None:
                slot.status = UNDECODABLE
        return slot

    # Inline bytes that need no decoding are only hashed: done here, since a thread hand-off costs more than a
    # sha256 of a few kB (this is the whole image work of tagging with a warm cache).
    inline = [not decode and t.kind in ("bytes", "invalid") for t in tasks]
    done: list[LoadedImage | None] = [work(t) if quick else None for t, quick in zip(tasks, inline)]
    pooled = [i for i, quick in enumerate(inline) if not quick]
    if pooled:
        with ThreadPoolExecutor(max_workers=max(1, min(options.workers, len(pooled)))) as pool:
            for i, slot in zip(pooled, pool.map(work, [tasks[i] for i in pooled])):
                done[i] = slot
    results = []
    for sources in products:
        slots = []
        for s in sources:
            got = done[task_of[(s.kind, s.ref) if s.kind in ("file", "url") else id(s)]]
            slots.append(LoadedImage(s, got.status, got.data, got.sha256, got.image))
        results.append(ProductImages(slots))
    return results
