"""Prediction files, written incrementally and atomically.

A writer appends one batch of predictions at a time to a temporary file next to the target, and renames it into
place only when the whole catalog is done; an error or an interruption deletes the temporary file, so a target
path either holds a complete prediction file or is untouched.

Formats:
- ``parquet`` (default): one row per product: ``id``, ``labels`` (list[str], best first), ``scores``
  (list[float32]); the bundle id and settings are in the file's key-value metadata (``xmctag.*``).
- ``csv`` / ``jsonl``: one row per (product, rank): ``id``, ``rank`` (1 = best), ``label``, ``label_text``,
  ``score``, ``bundle_id``, ``bundle`` (the bundle directory, as in the Parquet metadata).

Without an explicit format it follows the output's extension (``resolve_format``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import polars as pl

from xmctag.errors import UserError

FORMATS = ("parquet", "csv", "jsonl")
# The extensions that name a format (what `xmctag eval` reads them as); any other extension is left to --format.
EXTENSIONS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}


def resolve_format(output: Path | None, fmt: str | None) -> str:
    """The format to write: ``fmt`` when given (it must agree with a known extension of ``output``), else the one
    ``output``'s extension names, else parquet."""
    if fmt is not None and fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    implied = EXTENSIONS.get(output.suffix.lower()) if output is not None else None
    if fmt is None:
        return implied or "parquet"
    if implied is not None and implied != fmt:
        raise UserError(f"--format {fmt} does not match --output {output} (a {output.suffix} file is {implied}); "
                        f"drop --format or change the extension")
    return fmt


class PredictionWriter:
    """``with PredictionWriter(path, fmt, metadata) as w: w.write(ids, labels, label_texts, scores)``."""

    def __init__(self, path: str | Path, fmt: str, metadata: dict[str, str]):
        if fmt not in FORMATS:
            raise UserError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
        self.path = Path(path)
        self.fmt = fmt
        self.metadata = metadata
        if self.path.is_dir():
            raise UserError(f"--output {self.path}: is a directory")
        if not self.path.parent.is_dir():
            raise UserError(f"--output {self.path}: directory {self.path.parent} does not exist")
        if self.path.exists() and not os.access(self.path, os.W_OK):
            raise UserError(f"--output {self.path}: exists and is read-only")
        self._parquet = None
        self._file = None
        self._tmp: Path | None = None

    def __enter__(self) -> "PredictionWriter":
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        except OSError as e:
            raise UserError(f"--output {self.path}: cannot write in {self.path.parent} ({e.strerror or e})") from None
        os.close(fd)
        self._tmp = Path(tmp)
        try:
            self._open()
        except BaseException:
            self._tmp.unlink(missing_ok=True)
            raise
        return self

    def _open(self) -> None:
        if self.fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            schema = pa.schema([("id", pa.string()), ("labels", pa.list_(pa.string())),
                                ("scores", pa.list_(pa.float32()))],
                               metadata={f"xmctag.{k}": str(v) for k, v in self.metadata.items()})
            self._parquet = pq.ParquetWriter(self._tmp, schema, compression="zstd")
            self._schema = schema
        else:
            self._file = open(self._tmp, "wb")
            if self.fmt == "csv":  # the header now: a run that tags no product still writes a readable CSV
                self._long([], [], [], []).write_csv(self._file, include_header=True)

    def write(self, ids: list[str], labels: list[list[str]], label_texts: list[list[str]],
              scores: list[np.ndarray]) -> None:
        if self.fmt == "parquet":
            import pyarrow as pa

            table = pa.table({"id": pa.array(ids, pa.string()), "labels": pa.array(labels, pa.list_(pa.string())),
                              "scores": pa.array([s.tolist() for s in scores], pa.list_(pa.float32()))},
                             schema=self._schema)
            self._parquet.write_table(table)
            return
        long = self._long(ids, labels, label_texts, scores)
        if self.fmt == "csv":
            long.write_csv(self._file, include_header=False)
        else:
            long.write_ndjson(self._file)

    def _long(self, ids: list[str], labels: list[list[str]], label_texts: list[list[str]],
              scores: list[np.ndarray]) -> pl.DataFrame:
        """One row per (product, rank), the CSV/JSONL layout."""
        counts = [len(x) for x in labels]
        return pl.DataFrame({
            "id": pl.Series(np.repeat(np.array(ids, dtype=object), counts).tolist(), dtype=pl.String),
            "rank": pl.Series([r for n in counts for r in range(1, n + 1)], dtype=pl.Int32),
            "label": pl.Series([x for row in labels for x in row], dtype=pl.String),
            "label_text": pl.Series([x for row in label_texts for x in row], dtype=pl.String),
            "score": pl.Series(np.concatenate(scores) if scores else [], dtype=pl.Float32),
        }).with_columns(bundle_id=pl.lit(self.metadata.get("bundle_id", ""), pl.String),
                        bundle=pl.lit(self.metadata.get("bundle", ""), pl.String))

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if self._parquet is not None:
                self._parquet.close()
            if self._file is not None:
                self._file.close()
        finally:
            if exc_type is None:
                try:
                    self._tmp.replace(self.path)
                except OSError as e:
                    self._tmp.unlink(missing_ok=True)
                    raise UserError(f"--output {self.path}: cannot replace it ({e.strerror or e})") from None
            else:
                self._tmp.unlink(missing_ok=True)
