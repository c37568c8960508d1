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
unavailable"``), for the caller to count and report. URLs are fetched with the standard library (``urllib``) from a
bounded thread pool, with a timeout and retries with exponential backoff on errors that may pass (timeouts,
connection errors, HTTP 408/429/5xx). After ``NETWORK_FAILURES_TO_GIVE_UP`` URLs in a row failed without any answer
from a server (offline machine, no DNS), the run stops fetching: its remaining URLs are skipped at once, with a warning.
"""

from __future__ import annotations

import hashlib
import io
import random
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.client import HTTPException
from pathlib import Path
from typing import Any, Callable, Iterable

OK = "ok"
NULL = "null"
MISSING = "missing"
UNDECODABLE = "undecodable"
FETCH_FAILED = "fetch_failed"
UNSUPPORTED = "unsupported"
NETWORK_SKIPPED = "skipped: network unavailable"

_RETRY_HTTP_CODES = {408, 425, 429, 500, 502, 503, 504}
# URLs in a row that got no answer at all (connection refused, DNS, timeout) before a run stops fetching: offline,
# each unreachable URL costs its timeout and retries, which over a million URLs is days.
NETWORK_FAILURES_TO_GIVE_UP = 50


class NetworkGate:
    """Shared by a run's fetches (``FetchOptions.gate``): counts URLs in a row that reached no server, and closes
    (no more fetching, one warning) after ``NETWORK_FAILURES_TO_GIVE_UP``. An HTTP answer, even an error, resets it."""

    def __init__(self):
        self._lock = threading.Lock()
        self.failures_in_a_row = 0
        self.closed = False

    def record(self, reached_server: bool, reason: str = "") -> None:
        with self._lock:
            if reached_server:
                self.failures_in_a_row = 0
                return
            self.failures_in_a_row += 1
            if self.closed or self.failures_in_a_row < NETWORK_FAILURES_TO_GIVE_UP:
                return
            self.closed = True
        warnings.warn(f"image URLs: {self.failures_in_a_row} in a row reached no server (last: {reason}); not "
                      f"fetching the others of this run (counted as '{NETWORK_SKIPPED}')", stacklevel=2)


@dataclass
class FetchOptions:
    """How image bytes are read. ``timeout`` is per socket operation (connect, each read), in seconds."""

    workers: int = 16  # threads reading files and URLs (I/O bound; decoding also runs there, PIL frees the GIL)
    timeout: float = 10.0
    retries: int = 2  # extra attempts after the first, for errors that may pass
    backoff: float = 0.5  # seconds before the first retry, doubled each time (plus up to 25 % jitter)
    max_bytes: int = 32 * 1024 * 1024  # larger downloads are refused: no product photo needs more
    user_agent: str = "xmctag (product image fetcher)"
    gate: NetworkGate = field(default_factory=NetworkGate, repr=False, compare=False)  # state of the run's fetches


@dataclass(frozen=True)
class Source:
    """Where one image comes from. ``kind`` is ``"bytes"``, ``"file"``, ``"url"`` or ``"invalid"``.

    ``ref``: the absolute path (file), the URL (url), ``"<N bytes>"`` (bytes) or the value as written (invalid, with
    the ``reason`` it cannot be used).
    """

    kind: str
    ref: str
    data: bytes | None = field(default=None, repr=False, compare=False)
    reason: str | None = field(default=None, compare=False)

    def key(self) -> str | None:
        """A stable name of the source's current content, for remembering which sha256 it had (``SourceIndex``).

        URL: the URL itself. File: path, size and modification time, so an edited file gets a new key. ``None``
        for inline bytes (their sha256 is known without any lookup) and for files that cannot be stat'ed.
        """
        if self.kind == "url":
            return "url:" + self.ref
        if self.kind == "file":
            try:
                st = Path(self.ref).stat()
            except OSError:
                return None
            return f"file:{self.ref}\x00{st.st_size}\x00{st.st_mtime_ns}"
        return None


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
# Reading bytes


def read_source(source: Source, options: FetchOptions | None = None) -> tuple[bytes | None, str]:
    """``(content bytes, "ok")`` or ``(None, reason)``. Never raises for a bad source."""
    options = options or FetchOptions()
    if source.kind == "bytes":
        return source.data, OK
    if source.kind == "invalid":
        return None, source.reason
    if source.kind == "file":
        return _read_file(Path(source.ref), options)
    return _fetch_url(source.ref, options)


def _read_file(path: Path, options: FetchOptions) -> tuple[bytes | None, str]:
    try:
        if path.stat().st_size > options.max_bytes:
            return None, f"{FETCH_FAILED}: file larger than {options.max_bytes} bytes"
        return path.read_bytes(), OK
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None, MISSING
    except OSError as e:
        return None, f"{FETCH_FAILED}: {e.strerror or type(e).__name__}"


def _fetch_url(url: str, options: FetchOptions) -> tuple[bytes | None, str]:
    gate = options.gate
    if gate.closed:
        return None, NETWORK_SKIPPED
    request = urllib.request.Request(url, headers={"User-Agent": options.user_agent, "Accept": "image/*,*/*;q=0.5"})
    reason, answered = "", False
    for attempt in range(options.retries + 1):
        if attempt:
            delay = options.backoff * 2 ** (attempt - 1)
            time.sleep(delay * (1 + 0.25 * random.random()))  # jitter: retries of many threads do not line up
            if gate.closed:
                return None, NETWORK_SKIPPED
        try:
            with urllib.request.urlopen(request, timeout=options.timeout) as response:
                data = response.read(options.max_bytes + 1)
            gate.record(reached_server=True)
            if len(data) > options.max_bytes:
                return None, f"{FETCH_FAILED}: larger than {options.max_bytes} bytes"
            return data, OK
        except urllib.error.HTTPError as e:
            reason, answered = f"HTTP {e.code}", True
            if e.code not in _RETRY_HTTP_CODES:
                break
        except urllib.error.URLError as e:
            if isinstance(e.reason, (TimeoutError, socket.timeout)):
                reason = "timeout"
            else:
                reason = str(e.reason) or type(e.reason).__name__
        except (TimeoutError, socket.timeout):
            reason = "timeout"
        except (ConnectionError, HTTPException, OSError) as e:
            reason = type(e).__name__
        except ValueError as e:  # malformed URL
            return None, f"{FETCH_FAILED}: {e}"
    gate.record(reached_server=answered, reason=reason)
    return None, f"{FETCH_FAILED}: {reason}"


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
