"""Catalogs to tag: the file checks, the streamed read, and the rows a tagger can use.

A catalog to tag is a Parquet file with an id column and the model's text columns (and, for a bundle with image
fusion, optionally its image column). ``CatalogColumns`` knows those names (from the bundle's ``Config``):

- ``check_file(path)`` -> the columns to read, after checking the file is a readable Parquet file (by content, not
  by extension) whose id and text columns read as strings; every problem is a one-line ``UserError``;
- ``prepare(frame)`` -> ``id``, ``text`` (and ``image``) of the rows that have an id and text; the others are
  counted by reason (``SKIP_NO_ID``, ``SKIP_EMPTY_TEXT``), or under ``strict`` the first one is an error naming it.

``read_batches`` streams the file with polars in frames of about ``batch_size`` rows: memory is bounded by the
batch, not the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from xmctag.errors import UserError, first_line
from xmctag.io.datasets import check_columns, check_text_column, is_parquet, product_text_expr

SKIP_EMPTY_TEXT = "empty text"
SKIP_NO_ID = "no id"


@dataclass(frozen=True)
class CatalogColumns:
    """The columns a model reads from a catalog: ``id_col``, ``text_cols`` and (image fusion) ``image_col``."""

    id_col: str
    text_cols: tuple[str, ...]
    image_col: str | None = None

    def check_file(self, catalog: Path) -> list[str]:
        """The columns to read from ``catalog``, after checking that it is a Parquet file with the id and text
        columns, of types that read as strings (a catalog without the image column is tagged from text only)."""
        if catalog.is_dir():
            raise UserError(f"{catalog}: is a directory, not a Parquet file")
        if not catalog.is_file():
            raise UserError(f"{catalog}: no such file")
        if not is_parquet(catalog):  # by content: a CSV named .parquet, or a Parquet file named .csv, is caught
            raise UserError(f"{catalog}: not a Parquet file (xmctag tag reads Parquet catalogs)")
        try:
            schema = pl.read_parquet_schema(catalog)
        except Exception as e:  # noqa: BLE001 - polars, pyarrow and OS errors all mean the same thing here
            raise UserError(f"{catalog}: not a readable Parquet file ({first_line(e)})") from None
        self.check_schema(catalog, schema)
        columns = [self.id_col, *self.text_cols]
        if self.image_col is not None and self.image_col in schema:
            columns.append(self.image_col)
        return columns

    def check_schema(self, source, schema) -> None:
        """The id and text columns are in ``schema``, of types that read as strings."""
        check_columns(Path(source), list(schema), [self.id_col, *self.text_cols])
        check_text_column(source, self.id_col, schema[self.id_col], "a product id")
        for column in self.text_cols:
            check_text_column(source, column, schema[column], "product text")

    def prepare(self, frame: pl.DataFrame, source: str, row_offset: int = 0, strict: bool = False,
                skipped: dict[str, int] | None = None) -> pl.DataFrame:
        """``id``, ``text`` (and ``image``) of the rows that have an id and text; the others are counted in
        ``skipped`` by reason, or under ``strict`` the first of them is an error. The callers check the columns
        (``check_schema``): once per file, not once per batch."""
        columns = [pl.col(self.id_col).cast(pl.String).alias("id"),
                   product_text_expr(list(self.text_cols)).alias("text")]
        if self.image_col is not None and self.image_col in frame.columns:
            columns.append(pl.col(self.image_col).alias("image"))
        prepared = frame.select(columns)
        no_id = prepared["id"].str.strip_chars().str.len_chars().fill_null(0) == 0  # null, empty or blank
        empty = prepared["text"].is_null() & ~no_id  # a row without either counts once, as "no id"
        bad = no_id | empty
        if strict and bad.any():
            row = int(bad.arg_true()[0])
            if no_id[row]:
                raise UserError(f"{source}: row {row_offset + row} has no id in column {self.id_col!r} (--strict)")
            raise UserError(f"{source}: row {row_offset + row} (id {prepared['id'][row]!r}) has no text in "
                            f"{', '.join(self.text_cols)} (--strict)")
        if skipped is not None:
            for reason, mask in ((SKIP_NO_ID, no_id), (SKIP_EMPTY_TEXT, empty)):
                if n := int(mask.sum()):
                    skipped[reason] = skipped.get(reason, 0) + n
        return prepared.filter(~bad)


def read_batches(catalog: Path, columns: list[str], batch_size: int):
    """Polars streaming read: frames of about ``batch_size`` rows, memory bounded by the batch, not the file."""
    try:
        yield from pl.scan_parquet(catalog).select(columns).collect_batches(chunk_size=batch_size)
    except (pl.exceptions.PolarsError, OSError) as e:
        raise UserError(f"{catalog}: cannot read ({first_line(e)})") from None


def count_rows(catalog: Path) -> int:
    return pl.scan_parquet(catalog).select(pl.len()).collect().item()


def default_output_path(catalog: Path, fmt: str) -> Path:
    """``<catalog>.predictions.<format>`` beside the catalog."""
    suffix = {"parquet": ".parquet", "csv": ".csv", "jsonl": ".jsonl"}.get(fmt, f".{fmt}")
    return catalog.with_name(f"{catalog.stem}.predictions{suffix}")
