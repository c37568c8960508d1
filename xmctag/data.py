"""Reading the data contract: training catalogs, label tables and catalogs to tag.

- Training catalog (Parquet): ``id``, the text columns (default ``title``), ``labels`` (list of label ids).
- Label table (Parquet or CSV): ``label`` (id), ``text``, optional extra text columns (synonyms; a list column
  or a string).
- Catalog to tag (Parquet): ``id`` and the text columns the model was trained on.

Column names come from the ``Config``. Every problem a user can fix raises ``UserError`` naming the file and
column; rows that cannot be used are skipped and counted, never silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from xmctag.config import Config
from xmctag.errors import UserError

TEXT_SEPARATOR = " ; "


def read_table(path: str | Path, columns: list[str] | None = None) -> pl.DataFrame:
    """A whole Parquet or CSV file (chosen by extension), checking that ``columns`` exist."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    check_columns(path, table_schema(path), columns or [])
    try:
        if path.suffix.lower() == ".csv":
            return pl.read_csv(path, columns=columns, infer_schema_length=10000)
        return pl.read_parquet(path, columns=columns)
    except (pl.exceptions.PolarsError, OSError) as e:
        raise UserError(f"{path}: cannot read ({_first_line(e)})") from None


def table_schema(path: Path) -> pl.Schema:
    try:
        if path.suffix.lower() == ".csv":
            return pl.scan_csv(path, infer_schema_length=10000).collect_schema()
        return pl.read_parquet_schema(path)
    except (pl.exceptions.PolarsError, OSError) as e:
        raise UserError(f"{path}: not a readable {'CSV' if path.suffix.lower() == '.csv' else 'Parquet'} file "
                        f"({_first_line(e)})") from None


def check_columns(path: Path, schema: pl.Schema, columns: list[str]) -> None:
    missing = [c for c in columns if c not in schema]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)} (has: {', '.join(schema.names())})")


def product_text_expr(text_cols: list[str]) -> pl.Expr:
    """The text a product is encoded from: its non-empty text columns joined in order; null if none has text."""
    parts = [pl.col(c).cast(pl.String).str.strip_chars() for c in text_cols]
    parts = [pl.when(p.str.len_chars() > 0).then(p) for p in parts]
    return pl.concat_str(parts, separator=TEXT_SEPARATOR, ignore_nulls=True).replace("", None)


@dataclass
class LabelTable:
    """The label set: ``ids[i]`` is label index i; ``texts[i]`` what the encoder reads for it (text + synonyms)."""

    ids: list[str]
    texts: list[str]
    display: list[str]  # the plain label text, for output files
    index: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.index = {label: i for i, label in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def load(cls, path: str | Path, config: Config) -> "LabelTable":
        path = Path(path)
        schema = table_schema(path)
        extra = [c for c in config.label_extra_cols if c in schema]
        frame = read_table(path, [config.label_id_col, config.label_text_col, *extra])
        ids = frame[config.label_id_col].cast(pl.String)
        if ids.null_count():
            raise UserError(f"{path}: column {config.label_id_col} has {ids.null_count()} null label id(s)")
        dupes = ids.filter(ids.is_duplicated()).unique().head(3).to_list()
        if dupes:
            raise UserError(f"{path}: duplicate label id(s) in column {config.label_id_col}: {', '.join(dupes)}")
        display = frame[config.label_text_col].cast(pl.String).fill_null("")
        side = [pl.col(config.label_text_col).cast(pl.String)]
        for c in extra:
            col = pl.col(c).list.join(TEXT_SEPARATOR) if isinstance(schema[c], pl.List) else pl.col(c).cast(pl.String)
            side.append(pl.when(col.str.len_chars() > 0).then(col))
        texts = frame.select(pl.concat_str(side, separator=TEXT_SEPARATOR, ignore_nulls=True)).to_series()
        # A label without any text is still a label: its id is the only text we have.
        texts = pl.select(pl.when(texts.str.len_chars() > 0).then(texts).otherwise(ids)).to_series()
        return cls(ids=ids.to_list(), texts=texts.to_list(), display=display.to_list())

    def to_frame(self) -> pl.DataFrame:
        return pl.DataFrame({"label": self.ids, "text": self.display, "encoder_text": self.texts})

    @classmethod
    def from_frame(cls, frame: pl.DataFrame) -> "LabelTable":
        return cls(ids=frame["label"].to_list(), texts=frame["encoder_text"].to_list(), display=frame["text"].to_list())


@dataclass
class LabelledSet:
    """Products with their true labels: ``texts[i]`` has label indices ``labels[i]`` (int64 array)."""

    ids: list[str]
    texts: list[str]
    labels: list[np.ndarray]
    skipped: dict[str, int]  # reason -> rows left out
    unknown_labels: int = 0  # label mentions not in the label table (dropped from their rows)

    def __len__(self) -> int:
        return len(self.texts)

    def label_counts(self, n_labels: int) -> np.ndarray:
        return np.bincount(np.concatenate(self.labels), minlength=n_labels) if self.labels else np.zeros(n_labels)


def load_labelled_set(path: str | Path, config: Config, labels: LabelTable) -> LabelledSet:
    """Rows of a training/dev catalog with known labels. Rows without text or labels are skipped and counted."""
    path = Path(path)
    frame = read_table(path, [config.id_col, *config.text_cols, config.labels_col])
    label_col = frame[config.labels_col]
    if not isinstance(label_col.dtype, pl.List):
        raise UserError(f"{path}: column {config.labels_col} must be a list of label ids, got {label_col.dtype}")
    frame = frame.select(
        pl.col(config.id_col).cast(pl.String).alias("id"),
        product_text_expr(config.text_cols).alias("text"),
        pl.col(config.labels_col).list.eval(pl.element().cast(pl.String)).alias("labels"),
    )
    skipped = {"no text": 0, "no known label": 0}
    ids, texts, label_lists = [], [], []
    unknown = 0
    lookup = labels.index
    for row_id, text, row_labels in frame.iter_rows():
        if text is None:
            skipped["no text"] += 1
            continue
        known = [lookup[x] for x in (row_labels or []) if x in lookup]
        unknown += len(row_labels or []) - len(known)
        if not known:
            skipped["no known label"] += 1
            continue
        ids.append(row_id)
        texts.append(text)
        label_lists.append(np.unique(np.array(known, dtype=np.int64)))
    if not texts:
        raise UserError(f"{path}: no usable rows (each needs text in {', '.join(config.text_cols)} and a label "
                        f"from the label table)")
    return LabelledSet(ids, texts, label_lists, {k: v for k, v in skipped.items() if v}, unknown)


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
