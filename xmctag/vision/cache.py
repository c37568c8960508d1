"""An on-disk cache of image embeddings, keyed by (sha256 of the image's content bytes, vision model id).

Embedding a picture costs far more than reading it, and a nightly catalog mostly repeats yesterday's pictures, so
every embedding is kept. Layout under the cache directory::

    embeddings/<16 hex of sha256(model_id)>/model.json          {"model_id": ..., "dim": ...}
    embeddings/<...>/<shard>.values.npy, <shard>.keys.npy       (N, dim) float32 and (N, 32) uint8 sha256 digests
    sources/<shard>.values.npy, <shard>.keys.npy                (N, 32) content sha256 and (N, 32) source-key sha256

Shards are append-only: each ``add`` writes one new pair of files, each to a temporary name, flushed and fsync'ed,
then renamed; the keys file is renamed last and is what makes a shard visible. A process that dies mid-write leaves
at most an invisible temporary or orphaned values file, never a half-written shard, and several processes may add
to one cache (shard names are unique; each sees the others' shards after ``refresh``).

At open, the keys of all shards are read (32 bytes per entry: 32 MB for 1M pictures) into one sorted array searched
with ``np.searchsorted``; values stay on disk and are memory-mapped, so memory does not grow with the cache. Entries
added since the open live in a small dict until ``refresh`` merges them. When a key is present twice (two processes
embedded the same picture, or a source changed content), the newest shard wins.

``SourceIndex`` (the ``sources/`` table) remembers which content a URL or file had when it was last read (see
``xmctag.vision.images.Source.key``), so that training and tagging can find a product's cached embedding without
fetching its URL again.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from xmctag.errors import UserError

KEY_BYTES = 32
_KEY = np.dtype((np.void, KEY_BYTES))
_MERGE_AFTER = 200_000  # entries added in this process before the pending dict is merged into the sorted index


def default_cache_dir() -> Path:
    """``$XMCTAG_CACHE_DIR`` if set, else ``~/.cache/xmctag``."""
    return Path(os.environ.get("XMCTAG_CACHE_DIR") or Path.home() / ".cache" / "xmctag")


def check_cache_dir(path: str | Path, option: str = "--cache-dir") -> None:
    """A ``UserError`` naming ``option`` unless ``path`` is a writable directory or can be created as one. Creates
    nothing (training checks its cache before it writes anything)."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if existing == path:
        reason = ("not a directory" if not path.is_dir() else
                  "not writable" if not os.access(path, os.W_OK | os.X_OK) else None)
    elif not existing.is_dir():
        reason = f"cannot create it ({existing} is not a directory)"
    elif not os.access(existing, os.W_OK | os.X_OK):
        reason = f"cannot create it ({existing} is not writable)"
    else:
        reason = None
    if reason:
        raise UserError(f"{option} {path}: {reason}")


def _open_cache_dir(path: Path) -> Path:
    """``path`` created if needed; a ``UserError`` if it is no usable directory (rather than an OSError traceback)."""
    check_cache_dir(path, "image cache")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"image cache {path}: cannot create it ({e.strerror or e})") from None
    return path


def hex_to_keys(hex_digests: Sequence[str]) -> np.ndarray:
    """sha256 hex digests -> ``(N, 32)`` uint8."""
    if not len(hex_digests):
        return np.zeros((0, KEY_BYTES), dtype=np.uint8)
    raw = b"".join(bytes.fromhex(h) for h in hex_digests)
    return np.frombuffer(raw, dtype=np.uint8).reshape(-1, KEY_BYTES)


class ShardedTable:
    """Append-only ``key (32 bytes) -> value row`` table in a directory of shard files (see the module docstring)."""

    def __init__(self, directory: str | Path, value_shape: tuple[int, ...], dtype: str | np.dtype):
        self.directory = Path(directory)
        self.value_shape = tuple(value_shape)
        self.dtype = np.dtype(dtype)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._shards: list[str] = []  # shard names, in load order
        self._values: list[np.ndarray] = []  # memory-mapped values of each shard
        self._keys_cache: dict[str, np.ndarray] = {}  # keys of each shard, by name (for rebuilding the index)
        self._sorted = np.zeros(0, dtype=_KEY)  # unique keys, sorted
        self._where = np.zeros((0, 2), dtype=np.int64)  # (shard index, row) of each sorted key
        self._pending: dict[bytes, tuple[int, int]] = {}  # added since the last merge (newest wins)
        self.refresh()

    def __len__(self) -> int:
        return len(self._sorted) + sum(1 for k in self._pending if not self._in_sorted(k))

    def _in_sorted(self, key: bytes) -> bool:
        probe = np.frombuffer(key, dtype=_KEY)
        i = int(np.searchsorted(self._sorted, probe)[0])
        return i < len(self._sorted) and self._sorted[i] == probe[0]

    # -- reading ----------------------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Loads shards written since the last refresh (by any process) and rebuilds the sorted index."""
        known = set(self._shards)
        names = sorted(p.name.removesuffix(".keys.npy") for p in self.directory.glob("*.keys.npy"))
        for name in names:
            if name in known:
                continue
            loaded = self._load_shard(name)
            if loaded is not None:
                self._shards.append(name)
                self._values.append(loaded)
        self._rebuild()

    def _load_shard(self, name: str) -> np.ndarray | None:
        try:
            keys = np.load(self.directory / f"{name}.keys.npy", allow_pickle=False)
            values = np.load(self.directory / f"{name}.values.npy", mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            warnings.warn(f"image cache: skipping unreadable shard {self.directory / name}: {e}", stacklevel=3)
            return None
        if keys.dtype != np.uint8 or keys.shape[1:] != (KEY_BYTES,) or values.dtype != self.dtype \
                or values.shape != (len(keys), *self.value_shape):
            warnings.warn(f"image cache: skipping shard {self.directory / name} with unexpected shapes "
                          f"{keys.shape} / {values.shape}", stacklevel=3)
            return None
        self._keys_cache[name] = keys
        return values

    def _rebuild(self) -> None:
        parts, where = [], []
        by_time = sorted(range(len(self._shards)), key=lambda i: self._shards[i])  # names start with the write time
        for index in by_time:
            keys = self._keys_cache[self._shards[index]]
            parts.append(np.ascontiguousarray(keys).view(_KEY).ravel())
            where.append(np.stack([np.full(len(keys), index), np.arange(len(keys))], axis=1))
        if not parts:
            return
        keys = np.concatenate(parts)
        positions = np.concatenate(where).astype(np.int64)
        order = np.argsort(keys, kind="stable")  # equal keys keep write order ...
        keys, positions = keys[order], positions[order]
        last = np.ones(len(keys), dtype=bool)  # ... so the last of each run of equal keys is the newest
        last[:-1] = keys[1:] != keys[:-1]
        self._sorted, self._where = keys[last], positions[last]
        self._pending = {}

    def locate(self, keys: np.ndarray) -> np.ndarray:
        """``(N, 32)`` uint8 keys -> ``(N, 2)`` (shard index, row), ``-1`` where absent."""
        out = np.full((len(keys), 2), -1, dtype=np.int64)
        if not len(keys):
            return out
        probes = np.ascontiguousarray(keys, dtype=np.uint8).view(_KEY).ravel()
        if len(self._sorted):
            i = np.minimum(np.searchsorted(self._sorted, probes), len(self._sorted) - 1)
            hit = self._sorted[i] == probes
            out[hit] = self._where[i[hit]]
        if self._pending:
            for n, probe in enumerate(probes):
                found = self._pending.get(probe.tobytes())
                if found is not None:
                    out[n] = found
        return out

    def get(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(values (N, *value_shape), found (N,) bool)``; rows of absent keys are zeros."""
        where = self.locate(keys)
        found = where[:, 0] >= 0
        values = np.zeros((len(keys), *self.value_shape), dtype=self.dtype)
        for shard in np.unique(where[found, 0]):
            pick = where[:, 0] == shard
            values[pick] = self._values[shard][where[pick, 1]]
        return values, found

    # -- writing ----------------------------------------------------------------------------------------------
    def put(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Writes one new shard holding ``keys`` -> ``values`` (durable once this returns)."""
        keys = np.ascontiguousarray(keys, dtype=np.uint8)
        values = np.ascontiguousarray(values, dtype=self.dtype)
        if keys.ndim != 2 or keys.shape[1] != KEY_BYTES or values.shape != (len(keys), *self.value_shape):
            raise ValueError(f"put: keys {keys.shape} and values {values.shape} do not match "
                             f"(N, {KEY_BYTES}) and (N, {', '.join(map(str, self.value_shape))})")
        if not len(keys):
            return
        # Time first, so that name order is write order across processes; pid and random part keep names unique.
        name = f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        _atomic_save(self.directory / f"{name}.values.npy", values)
        _atomic_save(self.directory / f"{name}.keys.npy", keys)  # last: the shard exists from this rename on
        _fsync_dir(self.directory)
        self._keys_cache[name] = keys
        self._shards.append(name)
        self._values.append(np.load(self.directory / f"{name}.values.npy", mmap_mode="r", allow_pickle=False))
        index = len(self._shards) - 1
        for row, key in enumerate(keys.view(_KEY).ravel()):
            self._pending[key.tobytes()] = (index, row)
        if len(self._pending) > _MERGE_AFTER:
            self._rebuild()


def _atomic_save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.save(f, array)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the renames are still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class EmbeddingCache:
    """Image embeddings of one vision model: ``lookup(shas) -> (vectors, found)``, ``add(shas, vectors)``.

    ``shas`` are sha256 hex digests of image content bytes; ``vectors`` are ``(N, dim)`` float32.
    """

    def __init__(self, cache_dir: str | Path, model_id: str, dim: int):
        self.model_id = model_id
        self.dim = int(dim)
        directory = _open_cache_dir(Path(cache_dir)) / "embeddings" / hashlib.sha256(model_id.encode()).hexdigest()[:16]
        directory.mkdir(parents=True, exist_ok=True)
        _check_model_file(directory / "model.json", {"model_id": model_id, "dim": self.dim})
        self.table = ShardedTable(directory, (self.dim,), np.float32)

    def __len__(self) -> int:
        return len(self.table)

    def lookup(self, shas: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(vectors (N, dim) float32, found (N,) bool)``; rows not found are zeros."""
        return self.table.get(hex_to_keys(shas))

    def contains(self, shas: Sequence[str]) -> np.ndarray:
        return self.table.locate(hex_to_keys(shas))[:, 0] >= 0

    def add(self, shas: Sequence[str], vectors: np.ndarray) -> None:
        self.table.put(hex_to_keys(shas), np.asarray(vectors, dtype=np.float32))

    def refresh(self) -> None:
        self.table.refresh()


class SourceIndex:
    """Which content (sha256) a source key (``Source.key()``: URL, or path + size + mtime) had when last read."""

    _FAILED = bytes(KEY_BYTES)  # all zeros: the source was read and was unusable

    def __init__(self, cache_dir: str | Path):
        self.table = ShardedTable(_open_cache_dir(Path(cache_dir)) / "sources", (KEY_BYTES,), np.uint8)

    @staticmethod
    def _keys(source_keys: Sequence[str]) -> np.ndarray:
        return hex_to_keys([hashlib.sha256(k.encode()).hexdigest() for k in source_keys])

    def lookup(self, source_keys: Sequence[str]) -> list[str | None]:
        """Content sha256 hex per source key; ``None`` if never read, or unusable when last read."""
        values, found = self.table.get(self._keys(source_keys))
        return [row.tobytes().hex() if ok and row.tobytes() != self._FAILED else None
                for row, ok in zip(values, found)]

    def record(self, source_keys: Sequence[str], shas: Sequence[str | None]) -> None:
        """Remembers each source's content sha256 (``None``: the source failed, forget its old content)."""
        contents = hex_to_keys([s or self._FAILED.hex() for s in shas])
        self.table.put(self._keys(source_keys), contents)

    def refresh(self) -> None:
        self.table.refresh()


def _check_model_file(path: Path, expected: dict) -> None:
    if path.exists():
        try:
            found = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"image cache: cannot read {path}: {e}") from None
        if found != expected:
            raise UserError(f"image cache {path.parent}: holds {found}, expected {expected}; "
                            f"use another cache directory or remove that one")
        return
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(expected) + "\n")
    os.replace(tmp, path)
