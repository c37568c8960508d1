"""Reading prediction files, in every format ``xmctag tag`` writes (``xmctag.io.writers``).

``read_prediction_file(path)`` -> ``(frame, PredictionSource)``: ``id``, ``labels`` (best first) of each product, and
which bundle the file says made it (Parquet: the ``xmctag.*`` key-value metadata; CSV/JSONL: the ``bundle_id`` and
``bundle`` columns). With ``scores=True`` the frame also has ``scores`` (list[float64], aligned with ``labels``; null
for a file without scores: Parquet ``scores``, CSV/JSONL ``score``). The format is recognised by content for Parquet
(magic bytes), else by extension, else by the first byte (``{``: JSON Lines). Every problem is a ``UserError`` naming
the file and column.

``read_prediction_metadata(path)``: the provenance and settings ``tag`` recorded (``bundle_id``, ``bundle``,
``tagged_at``, ``top_k``, ...): a Parquet file's ``xmctag.*`` metadata, else the ``<file>.meta.json`` sidecar beside a
CSV/JSONL file (a JSON object of ``"xmctag.KEY": value``, at most 1 MiB; None when absent).
``read_prediction_products(path)``: everything ``tag`` wrote, one row per product in file order (``id``, ``labels``,
``scores``, ``content_hash``, and ``evidence_ids`` / ``evidence_scores`` when the file has them), for ``tag
--previous`` (``xmctag.incremental``); a repeated id is an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from xmctag.errors import UserError, first_line
from xmctag.io.datasets import check_columns, check_label_list_column, check_text_column, is_parquet

MAX_SIDECAR_BYTES = 1 << 20  # a real one is a few hundred bytes


@dataclass
class PredictionSource:
    """Which bundle made a prediction file, as the file records it (None: not recorded)."""

    bundle_id: str | None = None
    bundle: str | None = None  # its directory when tagged
    note: str | None = None  # why neither can be trusted (e.g. rows from several bundles)


LONG_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}


def prediction_format(path: Path) -> str:
    """parquet, csv or jsonl: by content for Parquet (magic bytes), else by extension, else by the first byte."""
    if is_parquet(path):
        return "parquet"
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        raise UserError(f"{path}: not a Parquet file (and not a prediction file xmctag writes)")
    if suffix in LONG_SUFFIXES:
        return LONG_SUFFIXES[suffix]
    with open(path, "rb") as f:
        return "jsonl" if f.read(64).lstrip().startswith(b"{") else "csv"


def read_predictions(path: str | Path, one_per_id: bool = True) -> pl.DataFrame:
    """``id``, ``labels`` (best first) from any prediction format."""
    return read_prediction_file(path, one_per_id)[0]


def read_prediction_file(path: str | Path, one_per_id: bool = True,
                         scores: bool = False) -> tuple[pl.DataFrame, PredictionSource]:
    """``id``, ``labels`` (best first) from any prediction format, and the bundle the file says made it.

    ``one_per_id``: a repeated id is an error (eval). False (``tag --show``): a row per product as written, the rows
    of a CSV/JSONL file grouped in file order (a product's ranks are consecutive rows from 1, as ``tag`` writes them).
    ``scores``: add the ``scores`` column (see the module docstring).
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not a prediction file")
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    fmt = prediction_format(path)
    if fmt == "parquet":
        return _read_parquet_predictions(path, one_per_id, scores)
    strings = ("id", "label", "bundle_id", "bundle")
    try:
        if path.stat().st_size == 0:  # JSON Lines of a run that tagged no product (polars cannot read it)
            long = pl.DataFrame(schema={"id": pl.String, "rank": pl.Int32, "label": pl.String})
        elif fmt == "csv":  # read as strings from the start: an id such as 007 stays 007
            long = pl.read_csv(path, schema_overrides=dict.fromkeys(strings, pl.String))
        else:  # JSON values carry their type; read_ndjson rejects overrides of columns the file lacks
            long = pl.read_ndjson(path)
    except (pl.exceptions.PolarsError, OSError) as e:
        raise UserError(f"{path}: cannot read predictions as {fmt.upper()} ({first_line(e)})") from None
    missing = {"id", "rank", "label"} - set(long.columns)
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(sorted(missing))} (a {fmt.upper()} prediction file "
                        f"has one row per product and rank: id, rank, label, ...)")
    for column in strings:
        if column in long.columns:
            check_text_column(path, column, long.schema[column], "strings")
    long = long.with_columns(pl.col(c).cast(pl.String) for c in strings if c in long.columns)
    if long.is_empty():  # a header only: nothing to infer the rank's type from
        long = long.with_columns(pl.col("rank").cast(pl.Int32))
    if not long.schema["rank"].is_integer():
        raise UserError(f"{path}: column 'rank' has type {long.schema['rank']}; expected integers (1 = best)")
    if scores:
        long = _with_score_column(path, long)
    if not one_per_id:
        return _group_in_file_order(long, scores), PredictionSource()
    # Sorted, as grouping needs it: a repeated (id, rank) is then a run of neighbours (cheaper than hashing every
    # pair with is_duplicated: bench/RESULTS.md, "xmctag diff").
    long = long.sort("id", "rank")
    same = ((pl.col("id") == pl.col("id").shift(1)) & (pl.col("rank") == pl.col("rank").shift(1))).fill_null(False)
    repeated = long.select(same | same.shift(-1).fill_null(False)).to_series()
    if repeated.any():
        row = long.row(int(repeated.arg_true()[0]), named=True)
        raise UserError(f"{path}: id {row['id']!r} has rank {row['rank']} twice ({int(repeated.sum())} rows share an "
                        "(id, rank)); a prediction file has one prediction list per product")
    source = PredictionSource()
    for key in ("bundle_id", "bundle"):
        values = long[key].drop_nulls().unique().to_list() if key in long.columns else []
        values = [v for v in values if v]
        if len(values) > 1:
            return _group_long(long, scores), PredictionSource(note=f"its rows come from {len(values)} different "
                                                                       "bundles")
        setattr(source, key, values[0] if values else None)
    return _group_long(long, scores), source


def _group_long(long: pl.DataFrame, scores: bool = False) -> pl.DataFrame:
    """One row per id from rows sorted by (id, rank)."""
    columns = [pl.col("label").alias("labels")] + ([pl.col("score").alias("scores")] if scores else [])
    grouped = long.group_by("id", maintain_order=True).agg(columns)
    return _without_scores_if_none(long, grouped, scores)


def _without_scores_if_none(long: pl.DataFrame, grouped: pl.DataFrame, scores: bool) -> pl.DataFrame:
    if scores and long.height and long["score"].null_count() == long.height:  # a file without scores
        return grouped.with_columns(scores=pl.lit(None, pl.List(pl.Float64)))
    return grouped


def _with_score_column(path: Path, long: pl.DataFrame) -> pl.DataFrame:
    """``score`` as Float64 (all null when the file has none, or only empty values); a score that is missing from
    some rows only, or not a finite number, is an error naming the row."""
    if "score" not in long.columns:
        return long.with_columns(score=pl.lit(None, pl.Float64))
    _check_numbers(path, "score", long.schema["score"], in_list=False)
    long = long.with_columns(pl.col("score").cast(pl.Float64))
    if long["score"].is_null().all():
        return long
    bad = long["score"].is_null() | ~long["score"].is_finite()
    if bad.any():
        row = long.row(int(bad.arg_true()[0]), named=True)
        raise UserError(f"{path}: id {row['id']!r}, rank {row['rank']}: score {row['score']} is not a finite number")
    return long


def _group_in_file_order(long: pl.DataFrame, scores: bool = False) -> pl.DataFrame:
    new_product = (pl.col("id") != pl.col("id").shift(1)) | (pl.col("rank") <= pl.col("rank").shift(1))
    columns = [pl.col("label").alias("labels")] + ([pl.col("score").alias("scores")] if scores else [])
    grouped = (long.with_columns(product=new_product.fill_null(True).cum_sum())
               .group_by("product", maintain_order=True).agg(pl.col("id").first(), *columns).drop("product"))
    return _without_scores_if_none(long, grouped, scores)


def _read_parquet_predictions(path: Path, one_per_id: bool = True,
                              scores: bool = False) -> tuple[pl.DataFrame, PredictionSource]:
    try:
        schema = pl.read_parquet_schema(path)
        metadata = read_parquet_metadata(path)
    except Exception as e:  # noqa: BLE001 - polars, pyarrow and OS errors all mean the same thing here
        raise UserError(f"{path}: not a readable Parquet file ({first_line(e)})") from None
    check_columns(path, list(schema), ["id", "labels"])
    check_text_column(path, "id", schema["id"], "a product id")
    check_label_list_column(path, "labels", schema["labels"])
    with_scores = scores and "scores" in schema
    if with_scores:
        dtype = schema["scores"]
        if not (isinstance(dtype, (pl.List, pl.Array)) and dtype.inner.is_numeric()):
            raise UserError(f"{path}: column 'scores' has type {dtype}; expected a list of numbers")
    try:
        frame = pl.read_parquet(path, columns=["id", "labels"] + (["scores"] if with_scores else []))
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path}: cannot read ({first_line(e)})") from None
    frame = frame.with_columns(pl.col("id").cast(pl.String), pl.col("labels").list.eval(pl.element().cast(pl.String)))
    if scores:
        frame = _checked_scores(path, frame, with_scores)
    repeated = frame["id"].is_duplicated()
    if one_per_id and repeated.any():
        raise UserError(f"{path}: id {frame['id'][int(repeated.arg_true()[0])]!r} is in more than one row "
                        f"({int(repeated.sum())} rows share an id); a prediction file has one prediction list per "
                        "product")
    return frame, PredictionSource(metadata.get("bundle_id") or None, metadata.get("bundle") or None)


def read_parquet_metadata(path: str | Path) -> dict[str, str]:
    """The ``xmctag.*`` key-value metadata of a prediction Parquet file (prefix stripped)."""
    import pyarrow.parquet as pq

    raw = pq.read_schema(path).metadata or {}
    return {k.decode().removeprefix("xmctag."): v.decode() for k, v in raw.items() if k.startswith(b"xmctag.")}


def _checked_scores(path: Path, frame: pl.DataFrame, present: bool) -> pl.DataFrame:
    """``scores`` as list[float64] (null when the file has none), one finite score per label of each row."""
    if not present:
        return frame.with_columns(scores=pl.lit(None, pl.List(pl.Float64)))
    frame = frame.with_columns(pl.col("scores").cast(pl.List(pl.Float64)))
    scores, labels = frame["scores"], frame["labels"]
    bad = ((scores.list.len().fill_null(0) != labels.list.len().fill_null(0))
           | scores.list.eval(~pl.element().is_finite() | pl.element().is_null()).list.any().fill_null(False))
    if bad.any():
        row = frame.row(int(bad.arg_true()[0]), named=True)
        n_scores, n_labels = len(row["scores"] or []), len(row["labels"] or [])
        problem = (f"{n_scores} scores for {n_labels} labels" if n_scores != n_labels
                   else "a score that is not a finite number")
        raise UserError(f"{path}: id {row['id']!r}: {problem} (expected one finite score per label)")
    return frame


def read_prediction_metadata(path: str | Path) -> dict[str, str] | None:
    """The ``xmctag.*`` settings a prediction file records, prefix stripped, values as strings (Parquet: its
    key-value metadata; CSV/JSONL: the sidecar ``<path>.meta.json``); None for a CSV/JSONL file without one."""
    import json

    from xmctag.io.writers import sidecar_path

    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not a prediction file")
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if prediction_format(path) == "parquet":
        try:
            return read_parquet_metadata(path)
        except Exception as e:  # noqa: BLE001 - pyarrow and OS errors all mean the same thing here
            raise UserError(f"{path}: not a readable Parquet file ({first_line(e)})") from None
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        return None
    try:
        if sidecar.stat().st_size > MAX_SIDECAR_BYTES:
            raise UserError(f"{sidecar}: larger than {MAX_SIDECAR_BYTES >> 20} MiB, not the metadata xmctag writes")
        values = json.loads(sidecar.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise UserError(f"{sidecar}: not valid JSON ({first_line(e)})") from None
    except OSError as e:
        raise UserError(f"{sidecar}: cannot read ({e.strerror or e})") from None
    if not isinstance(values, dict) or not all(isinstance(v, (str, int, float, bool)) or v is None
                                               for v in values.values()):
        raise UserError(f"{sidecar}: not the metadata xmctag writes (a JSON object of settings)")
    return {k.removeprefix("xmctag."): str(v) for k, v in values.items() if k.startswith("xmctag.")}


EVIDENCE_COLUMNS = ("evidence_ids", "evidence_scores")


def read_prediction_products(path: str | Path) -> pl.DataFrame:
    """One row per product, in file order: ``id`` (str), ``labels`` (list[str], best first), ``scores``
    (list[float32]), ``content_hash`` (str), and ``evidence_ids`` (list[str]) / ``evidence_scores``
    (list[float32]) when the file has them. Every column's type is checked; a file without ``content_hash`` (from an
    xmctag before 2026-12-03) or with an id in two products is an error naming it."""
    path = Path(path)
    fmt = prediction_format(path)
    products = _parquet_products(path) if fmt == "parquet" else _long_products(path, fmt)
    repeated = products["id"].is_duplicated()
    if repeated.any():
        raise UserError(f"{path}: id {products['id'][int(repeated.arg_true()[0])]!r} is in more than one product "
                        f"({int(repeated.sum())} rows share an id); a previous prediction file needs one per id")
    if products["id"].null_count():
        raise UserError(f"{path}: a product has no id (column 'id' has nulls)")
    return products


def _check_numbers(path: Path, column: str, dtype, in_list: bool) -> None:
    inner = dtype.inner if in_list and isinstance(dtype, (pl.List, pl.Array)) else (None if in_list else dtype)
    if inner is None or not (inner.is_numeric() or inner == pl.Null):
        raise UserError(f"{path}: column {column!r} has type {dtype}; expected "
                        + ("a list of numbers" if in_list else "numbers"))


def _parquet_products(path: Path) -> pl.DataFrame:
    try:
        schema = pl.read_parquet_schema(path)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path}: not a readable Parquet file ({first_line(e)})") from None
    check_columns(path, list(schema), ["id", "labels", "scores", "content_hash"])
    check_text_column(path, "id", schema["id"], "a product id")
    check_label_list_column(path, "labels", schema["labels"])
    _check_numbers(path, "scores", schema["scores"], in_list=True)
    check_text_column(path, "content_hash", schema["content_hash"], "a content hash")
    columns = ["id", "labels", "scores", "content_hash"]
    if "evidence_ids" in schema or "evidence_scores" in schema:
        check_columns(path, list(schema), list(EVIDENCE_COLUMNS))
        check_label_list_column(path, "evidence_ids", schema["evidence_ids"])
        _check_numbers(path, "evidence_scores", schema["evidence_scores"], in_list=True)
        columns += EVIDENCE_COLUMNS
    try:
        frame = pl.read_parquet(path, columns=columns)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path}: cannot read ({first_line(e)})") from None
    return frame.with_columns(_product_types(columns))


def _product_types(columns) -> list[pl.Expr]:
    types = {"id": pl.String, "labels": pl.List(pl.String), "scores": pl.List(pl.Float32), "content_hash": pl.String,
             "evidence_ids": pl.List(pl.String), "evidence_scores": pl.List(pl.Float32)}
    return [pl.col(c).cast(types[c]) for c in columns]


def _long_products(path: Path, fmt: str) -> pl.DataFrame:
    strings = ("id", "label", "content_hash", "evidence_ids", "evidence_scores")
    try:
        if path.stat().st_size == 0:  # JSON Lines of a run that tagged no product
            long = pl.DataFrame(schema={"id": pl.String, "rank": pl.Int32, "label": pl.String, "score": pl.Float32,
                                        "content_hash": pl.String})
        elif fmt == "csv":  # strings from the start: an id such as 007 stays 007; evidence arrays are JSON text
            header = pl.read_csv(path, n_rows=0).columns
            long = pl.read_csv(path, schema_overrides={c: pl.String for c in strings if c in header})
        else:
            long = pl.read_ndjson(path)
    except (pl.exceptions.PolarsError, OSError) as e:
        raise UserError(f"{path}: cannot read predictions as {fmt.upper()} ({first_line(e)})") from None
    check_columns(path, long.columns, ["id", "rank", "label", "score", "content_hash"])
    for column in ("id", "label", "content_hash"):
        check_text_column(path, column, long.schema[column], "strings")
    if long.is_empty():
        long = long.with_columns(pl.col("rank").cast(pl.Int32), pl.col("score").cast(pl.Float32))
    if not long.schema["rank"].is_integer():
        raise UserError(f"{path}: column 'rank' has type {long.schema['rank']}; expected integers (1 = best)")
    _check_numbers(path, "score", long.schema["score"], in_list=False)
    evidence = [c for c in EVIDENCE_COLUMNS if c in long.columns]
    if evidence:
        check_columns(path, long.columns, list(EVIDENCE_COLUMNS))
        if fmt == "csv":
            for column, inner in (("evidence_ids", pl.String), ("evidence_scores", pl.Float32)):
                try:
                    long = long.with_columns(pl.col(column).str.json_decode(pl.List(inner)))
                except pl.exceptions.PolarsError as e:
                    raise UserError(f"{path}: column {column!r} is not JSON arrays ({first_line(e)})") from None
        check_label_list_column(path, "evidence_ids", long.schema["evidence_ids"])
        _check_numbers(path, "evidence_scores", long.schema["evidence_scores"], in_list=True)
    long = long.with_columns(pl.col(c).cast(pl.String) for c in ("id", "label", "content_hash"))
    repeated = long.select("id", "rank").is_duplicated()
    if repeated.any():
        row = long.row(int(repeated.arg_true()[0]), named=True)
        raise UserError(f"{path}: id {row['id']!r} has rank {row['rank']} twice ({int(repeated.sum())} rows share an "
                        "(id, rank)); a previous prediction file needs one product per id")
    products = (long.with_row_index("_row").sort("id", "rank")
                .group_by("id", maintain_order=False)
                .agg(pl.col("_row").min(), pl.col("label").alias("labels"), pl.col("score").alias("scores"),
                     pl.col("content_hash").first(), pl.col("content_hash").n_unique().alias("_hashes"),
                     *[pl.col(c).first() for c in evidence])
                .sort("_row"))
    if (products["_hashes"] > 1).any():
        bad = products.filter(pl.col("_hashes") > 1)["id"][0]
        raise UserError(f"{path}: id {bad!r} has more than one content_hash in its rows")
    columns = ["id", "labels", "scores", "content_hash", *evidence]
    return products.select(columns).with_columns(_product_types(columns))
