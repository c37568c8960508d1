"""Prediction files, written incrementally and atomically.

A writer appends one batch of predictions at a time to a temporary file next to the target, and renames it into
place only when the whole catalog is done; an error or an interruption deletes the temporary file, so a target
path either holds a complete prediction file or is untouched (``xmctag.io.atomic``: also the lock that keeps a
second run off the same output, fsync, file modes, symlinks).

Formats:
- ``parquet`` (default): one row per product: ``id``, ``labels`` (list[str], best first), ``scores``
  (list[float32]), ``content_hash`` (str: what the model read of the product, ``xmctag.incremental``; null when the
  caller gave none); with evidence (``tag --evidence N``) also ``evidence_ids`` (list[str]) and
  ``evidence_scores`` (list[float32]); the bundle id and settings are in the file's key-value metadata
  (``xmctag.*``).
- ``csv`` / ``jsonl``: one row per (product, rank): ``id``, ``rank`` (1 = best), ``label``, ``label_text``,
  ``score``, ``bundle_id``, ``bundle`` (the bundle directory, as in the Parquet metadata), ``content_hash`` (the
  product's, on each of its rows); with evidence also ``evidence_ids`` and ``evidence_scores`` on each of the
  product's rows: JSON arrays (JSON Lines: arrays; CSV: the array's JSON text in one cell, e.g. ``["p7","p9"]``
  and ``[0.93,0.91]``). A product without labels (``--min-score``) has no rows in CSV/JSONL.

Batches come as a frame (``write_frame``), one row per product: ``PRODUCT_SCHEMA``, plus the evidence columns when
the writer was opened with ``evidence=True``.

Without an explicit format it follows the output's extension (``resolve_format``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import polars as pl

from xmctag.errors import UserError, environment_failure
from xmctag.io.atomic import AtomicOutput, write_json

FORMATS = ("parquet", "csv", "jsonl")
# The extensions that name a format (what `xmctag eval` reads them as); any other extension is left to --format.
EXTENSIONS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}
# One row per product, what ``write_frame`` takes (``label_texts``: for CSV/JSONL only).
PRODUCT_SCHEMA = {"id": pl.String, "labels": pl.List(pl.String), "label_texts": pl.List(pl.String),
                  "scores": pl.List(pl.Float32), "content_hash": pl.String}
EVIDENCE_SCHEMA = {"evidence_ids": pl.List(pl.String), "evidence_scores": pl.List(pl.Float32)}


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
    """``with PredictionWriter(path, fmt, metadata) as w: w.write(ids, labels, label_texts, scores)`` (or
    ``w.write_frame(products)``).

    The file reaches ``path`` through ``AtomicOutput`` (a lock per output, a temporary file renamed when complete,
    the umask's mode; see ``xmctag.io.atomic``). ``escape_formulas`` (CSV): cells starting with ``=``, ``+``, ``-``,
    ``@``, tab or carriage return get a leading ``'`` so that a spreadsheet shows them as text instead of running them
    as formulas (this changes those values: off by default). ``evidence``: the files have the evidence columns.
    """

    def __init__(self, path: str | Path, fmt: str, metadata: dict[str, str], escape_formulas: bool = False,
                 evidence: bool = False):
        if fmt not in FORMATS:
            raise UserError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
        self.path = Path(path)
        self.fmt = fmt
        self.metadata = metadata
        self.escape_formulas = escape_formulas and fmt == "csv"
        self.schema = {**PRODUCT_SCHEMA, **(EVIDENCE_SCHEMA if evidence else {})}
        self.output = AtomicOutput(self.path)
        self._parquet = None
        self._file = None
        self._tmp: Path | None = None

    def __enter__(self) -> "PredictionWriter":
        self._tmp = self.output.__enter__()
        try:
            self._guarded(self._open)
        except BaseException as e:
            self.output.__exit__(type(e), e, None)
            raise
        return self

    def _guarded(self, action, *args) -> None:
        """Runs ``action``, turning the machine's failures (disk full, I/O error) into ``EnvironmentFailure``."""
        try:
            action(*args)
        except Exception as e:  # noqa: BLE001 - pyarrow and polars report an OSError of the file in their own ways
            failure = machine_failure(e, f"writing --output {self.path}")
            if failure is None:
                raise
            raise failure from None

    def _open(self) -> None:
        if self.fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            fields = [("id", pa.string()), ("labels", pa.list_(pa.string())), ("scores", pa.list_(pa.float32())),
                      ("content_hash", pa.string())]
            if "evidence_ids" in self.schema:
                fields += [("evidence_ids", pa.list_(pa.string())), ("evidence_scores", pa.list_(pa.float32()))]
            schema = pa.schema(fields, metadata={f"xmctag.{k}": str(v) for k, v in self.metadata.items()})
            self._parquet = pq.ParquetWriter(self._tmp, schema, compression="zstd")
            self._schema = schema
        else:
            self._file = open(self._tmp, "wb")
            if self.fmt == "csv":  # the header now: a run that tags no product still writes a readable CSV
                self._long(pl.DataFrame(schema=self.schema)).write_csv(self._file, include_header=True)

    def write(self, ids: list[str], labels: list[list[str]], label_texts: list[list[str]],
              scores: list[np.ndarray], content_hashes: list[str] | None = None,
              evidence: tuple[list[list[str]], list[np.ndarray]] | None = None) -> None:
        """One batch of products as lists (``write_frame`` with those columns); ``evidence``: ``(ids, scores)``
        per product, for a writer opened with ``evidence=True``."""
        columns = {"id": ids, "labels": labels, "label_texts": label_texts, "scores": [s.tolist() for s in scores],
                   "content_hash": content_hashes if content_hashes is not None else [None] * len(ids)}
        if "evidence_ids" in self.schema:
            columns.update(evidence_ids=evidence[0], evidence_scores=[s.tolist() for s in evidence[1]])
        self.write_frame(pl.DataFrame(columns, schema=self.schema))

    def write_frame(self, products: pl.DataFrame) -> None:
        """Appends a batch: one row per product with the columns of ``PRODUCT_SCHEMA`` (and ``EVIDENCE_SCHEMA``)."""
        self._guarded(self._write, products.select(pl.col(c).cast(t) for c, t in self.schema.items()))

    def _write(self, products: pl.DataFrame) -> None:
        if self.fmt == "parquet":
            self._parquet.write_table(products.drop("label_texts").to_arrow().cast(self._schema))
            return
        long = self._long(products)
        if self.fmt == "csv":
            if self.escape_formulas:
                long = long.with_columns(escape_formula(pl.col(c)).alias(c) for c in ("id", "label", "label_text"))
            long.write_csv(self._file, include_header=False)
        else:
            long.write_ndjson(self._file)

    def _long(self, products: pl.DataFrame) -> pl.DataFrame:
        """One row per (product, rank), the CSV/JSONL layout."""
        long = (products.filter(pl.col("labels").list.len() > 0)
                .with_columns(rank=pl.int_ranges(1, pl.col("labels").list.len() + 1, dtype=pl.Int32))
                .explode("labels", "label_texts", "scores", "rank")
                .select("id", "rank", pl.col("labels").alias("label"), pl.col("label_texts").alias("label_text"),
                        pl.col("scores").alias("score"),
                        pl.lit(self.metadata.get("bundle_id", ""), pl.String).alias("bundle_id"),
                        pl.lit(self.metadata.get("bundle", ""), pl.String).alias("bundle"), "content_hash",
                        *[c for c in EVIDENCE_SCHEMA if c in products.columns]))
        if self.fmt == "csv" and "evidence_ids" in long.columns:  # a cell holds text: the arrays as JSON
            long = long.with_columns(json_array(pl.col(c)).alias(c) for c in EVIDENCE_SCHEMA)
        return long

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if self._parquet is not None:
                self._guarded(self._parquet.close)
            if self._file is not None:
                self._guarded(self._file.close)
            if exc_type is None:
                self.output.commit()
                if self.fmt != "parquet":  # CSV/JSONL have no metadata of their own: provenance beside them
                    write_json(sidecar_path(self.output.target), {f"xmctag.{k}": v for k, v in self.metadata.items()},
                               what="--output", lock=False)
        except BaseException as e:
            self.output.__exit__(type(e), e, None)
            raise
        self.output.__exit__(exc_type, exc, tb)


def sidecar_path(output: Path) -> Path:
    """Where a CSV/JSONL prediction file's provenance goes: ``<output>.meta.json``."""
    return output.with_name(output.name + ".meta.json")


def json_array(column: pl.Expr) -> pl.Expr:
    """A list column as the JSON text of its arrays (``["a","b"]``, ``[0.5,0.25]``)."""
    return pl.struct(column.alias("v")).struct.json_encode().str.strip_prefix('{"v":').str.strip_suffix("}")


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def escape_formula(column: pl.Expr) -> pl.Expr:
    """A leading ``'`` on values that a spreadsheet would run as a formula (OWASP's CSV injection advice)."""
    return pl.when(pl.any_horizontal([column.str.starts_with(c) for c in FORMULA_START])).then(
        pl.lit("'") + column).otherwise(column)


def machine_failure(e: BaseException, doing: str):
    """An ``EnvironmentFailure`` when ``e`` (or its cause) is the machine failing a write, else None. pyarrow and
    polars report it as an ``OSError`` subclass, with or without ``errno``, or only in their message ("os error 28",
    "No space left on device")."""
    import errno
    import re

    for error in (e, e.__cause__, e.__context__):
        if isinstance(error, OSError) and error.errno is not None:
            return environment_failure(error, doing)
    text = str(e)
    found = re.search(r"os error (\d+)", text)
    codes = [int(found.group(1))] if found else [c for c in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG,
                                                            errno.EROFS) if os.strerror(c) in text]
    return environment_failure(OSError(codes[0], os.strerror(codes[0])), doing) if codes else None
