"""``file_sha256``: the content hash that bundle manifests, prediction provenance and summaries record."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's content, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def files_sha256(paths: list[Path]) -> str:
    """The content hash of a catalog of one file or several: one file's ``file_sha256``; for several (a directory
    or glob of Parquet files), the sha256 of one line per file in the order given, ``<file name>\\t<its sha256>\\n``,
    so that renaming, adding, removing or changing a file changes it."""
    if len(paths) == 1:
        return file_sha256(paths[0])
    lines = "".join(f"{Path(p).name}\t{file_sha256(p)}\n" for p in paths)
    return hashlib.sha256(lines.encode("utf-8", "surrogateescape")).hexdigest()
