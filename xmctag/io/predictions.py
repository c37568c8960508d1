"""Reading prediction files, in every format ``xmctag tag`` writes (``xmctag.io.writers``).

``read_prediction_file(path)`` -> ``(frame, PredictionSource)``: ``id``, ``labels`` (best first) of each product, and
which bundle the file says made it (Parquet: the ``xmctag.*`` key-value metadata; CSV/JSONL: the ``bundle_id`` and
``bundle`` columns). With ``scores=True`` the frame also has ``scores`` (list[float64], aligned with ``labels``; null
for a file without scores: Parquet ``scores``, CSV/JSONL ``score``). The format is recognised by content for Parquet
(magic bytes), else by extension, else by the first byte (``{``: JSON Lines). Every problem is a ``UserError`` naming
the file and column.

``read_prediction_metadata(path)``: the provenance ``tag`` recorded (``bundle_id``, ``bundle``, ``tagged_at``,
``top_k``, ...): a Parquet file's ``xmctag.*`` metadata, else the ``<file>.meta.json`` sidecar beside a CSV/JSONL file
(a JSON object of ``"xmctag.KEY": value``, at most 1 MiB; absent: ``{}``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from xmctag.errors import UserError, first_line
from xmctag.io.datasets import check_columns, check_label_list_column, check_text_column, is_parquet


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
    dtype = long.schema["score"]
    if not (dtype.is_numeric() or dtype == pl.Null):
        raise UserError(f"{path}: column 'score' has type {dtype}; expected numbers")
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


SIDECAR_MAX_BYTES = 1 << 20


def read_prediction_metadata(path: str | Path) -> dict[str, str]:
    """What ``tag`` recorded about a prediction file (see the module docstring), values as strings."""
    import json

    from xmctag.io.writers import sidecar_path

    path = Path(path)
    if is_parquet(path):
        try:
            return read_parquet_metadata(path)
        except Exception as e:  # noqa: BLE001 - pyarrow and OS errors alike
            raise UserError(f"{path}: not a readable Parquet file ({first_line(e)})") from None
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        return {}
    try:
        with open(sidecar, "rb") as f:
            raw = f.read(SIDECAR_MAX_BYTES + 1)
        if len(raw) > SIDECAR_MAX_BYTES:
            raise ValueError(f"larger than {SIDECAR_MAX_BYTES} bytes")
        data = json.loads(raw)
    except (OSError, ValueError) as e:
        raise UserError(f"{sidecar}: not a readable provenance file ({first_line(e)})") from None
    if not isinstance(data, dict):
        raise UserError(f"{sidecar}: expected a JSON object of \"xmctag.KEY\": value, not {type(data).__name__}")
    return {k.removeprefix("xmctag."): v if isinstance(v, str) else json.dumps(v) for k, v in data.items()
            if k.startswith("xmctag.") and isinstance(v, (str, int, float, bool))}  # nested values: not provenance
