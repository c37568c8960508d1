"""Reading the data contract: training catalogs, label tables and catalogs to tag.

- Training catalog (Parquet): ``id``, the text columns (default ``title``), ``labels`` (list of label ids).
- Label table (Parquet or CSV, CSV read as strings): ``label`` (id), ``text``, optional extra text columns
  (synonyms, by default ``alt_texts`` and ``synonyms``; a list column or a string).
- Catalog to tag (Parquet): ``id`` and the text columns the model was trained on.
- With image fusion on (``Config.vision`` not ``"none"``), all three may have an image column (``Config.image_col``:
  bytes, paths, URLs or lists of them; see ``xmctag.vision.images``); its raw values are kept per row, aligned with
  the rows kept, for ``xmctag.vision.embed`` to resolve. A row's value may be None (no image).

Column names come from the ``Config``. Every problem a user can fix raises ``UserError`` naming the file and
column; rows that cannot be used are skipped and counted, never silently dropped.

Training reads with pyarrow alone, so the training path runs where polars is not installed (a GPU box with only
torch and pyarrow); tagging and evaluation use polars (``read_table``, ``product_text_expr``), imported when called.
Both sides build a product's text the same way (``product_text`` / ``product_text_expr``; a test holds them equal).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from xmctag.config import Config
from xmctag.errors import UserError, first_line

if TYPE_CHECKING:
    import polars as pl

TEXT_SEPARATOR = " ; "


def _is_csv(path: Path) -> bool:
    return path.suffix.lower() == ".csv"


def table_columns(path: Path) -> list[str]:
    """Column names of a Parquet or CSV file (chosen by extension), without reading its rows."""
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq

    try:
        if _is_csv(path):
            with pa_csv.open_csv(path) as reader:
                return reader.schema.names
        return pq.read_schema(path).names
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path}: not a readable {'CSV' if _is_csv(path) else 'Parquet'} file "
                        f"({first_line(e)})") from None


def check_columns(path: Path, names: list[str], columns: list[str]) -> None:
    missing = [c for c in columns if c not in names]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)} (has: {', '.join(names)})")


PARQUET_MAGIC = b"PAR1"


def is_parquet(path: Path) -> bool:
    """Whether ``path`` starts with Parquet's magic bytes (whatever its extension says)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(PARQUET_MAGIC)) == PARQUET_MAGIC
    except OSError:
        return False


def _is_scalar_text(dtype) -> bool:
    """Types a text or id column may have: strings (categoricals too), numbers (cast to their string), all-null."""
    import polars as pl

    return dtype in (pl.String, pl.Null) or dtype.is_numeric() or isinstance(dtype, (pl.Categorical, pl.Enum))


def check_text_column(path: str | Path, column: str, dtype, role: str = "text") -> None:
    """A ``UserError`` naming the file, column and type when ``column`` cannot be read as strings (lists, structs,
    binary, booleans, dates); ``role`` says what it is for ("text", "id")."""
    if not _is_scalar_text(dtype):
        raise UserError(f"{path}: column {column!r} has type {dtype}; expected {role} (a string column)")


def check_label_list_column(path: str | Path, column: str, dtype) -> None:
    """A ``UserError`` unless ``column`` is a list of label ids (strings or integers)."""
    import polars as pl

    if isinstance(dtype, (pl.List, pl.Array)) and _is_scalar_text(dtype.inner):
        return
    hint = " (CSV cannot hold lists: write the file as Parquet)" if _is_csv(Path(path)) else ""
    raise UserError(f"{path}: column {column!r} has type {dtype}; expected a list of label ids (list[str] or "
                    f"list[int]){hint}")


def read_arrow(path: str | Path, columns: list[str], optional: list[str] | tuple[str, ...] = ()) -> pa.Table:
    """The given columns of a whole Parquet or CSV file as an Arrow table (the training side's reader), plus those
    of ``optional`` that the file has."""
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    names = table_columns(path)
    check_columns(path, names, columns)
    columns = [*columns, *(c for c in optional if c in names and c not in columns)]
    try:
        if _is_csv(path):  # all strings: type inference would turn label ids "001" and "1e3" into 1 and 1000.0
            options = pa_csv.ConvertOptions(include_columns=columns, column_types=dict.fromkeys(columns, pa.string()))
            return pa_csv.read_csv(path, convert_options=options)
        return pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path}: cannot read ({first_line(e)})") from None


def read_table(path: str | Path, columns: list[str]) -> "pl.DataFrame":
    """``read_arrow`` as a polars frame (tagging and evaluation)."""
    import polars as pl

    return pl.from_arrow(read_arrow(path, columns))


def product_text(values: list[Any]) -> str | None:
    """The text a product is encoded from: its non-empty text columns (stripped) joined in order; None if none."""
    parts = [str(v).strip() for v in values if v is not None]
    return TEXT_SEPARATOR.join(p for p in parts if p) or None


def product_text_expr(text_cols: list[str]) -> "pl.Expr":
    """``product_text`` as a polars expression, for catalogs streamed through polars when tagging."""
    import polars as pl

    parts = [pl.col(c).cast(pl.String).str.strip_chars() for c in text_cols]
    parts = [pl.when(p.str.len_chars() > 0).then(p) for p in parts]
    return pl.concat_str(parts, separator=TEXT_SEPARATOR, ignore_nulls=True).replace("", None)


def _strings(table: pa.Table, column: str) -> list[str | None]:
    return table.column(column).cast(pa.string()).to_pylist()


def _is_list(type_: pa.DataType) -> bool:
    return pa.types.is_list(type_) or pa.types.is_large_list(type_) or pa.types.is_fixed_size_list(type_)


def wants_images(config: Config) -> bool:
    """Whether image columns are read at all (``vision`` is ``"auto"`` or a model; ``"none"``: text only)."""
    return config.vision != "none"


def _image_columns(config: Config) -> list[str]:
    """``[image_col]`` when images are wanted (read if the file has it), else ``[]`` (read nothing extra)."""
    return [config.image_col] if wants_images(config) else []


@dataclass
class LabelTable:
    """The label set: ``ids[i]`` is label index i; ``texts[i]`` what the encoder reads for it (text + synonyms).

    ``images``: the label's image-column value per label (None: no image), or None when the table has no images.
    ``groups``: the label table's group column (``label_group_col``), or None when it has none. ``exclusive``: each
    label's exclusive group once training has resolved them (``xmctag.label_groups``), else None.
    """

    ids: list[str]
    texts: list[str]
    display: list[str]  # the plain label text, for output files
    images: list[Any] | None = None
    groups: list[str | None] | None = None
    exclusive: list[str | None] | None = None
    index: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.index = {label: i for i, label in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def load(cls, path: str | Path, config: Config) -> "LabelTable":
        path = Path(path)
        table = read_arrow(path, [config.label_id_col, config.label_text_col],
                           optional=[*config.label_extra_cols, *_image_columns(config), config.label_group_col])
        extra = [c for c in config.label_extra_cols if c in table.column_names]
        image_col = [c for c in _image_columns(config) if c in table.column_names]
        ids = _strings(table, config.label_id_col)
        nulls = sum(x is None for x in ids)
        if nulls:
            raise UserError(f"{path}: column {config.label_id_col} has {nulls} null label id(s)")
        seen: set[str] = set()
        dupes = list(dict.fromkeys(x for x in ids if x in seen or seen.add(x)))[:3]
        if dupes:
            raise UserError(f"{path}: duplicate label id(s) in column {config.label_id_col}: {', '.join(dupes)}")
        display = [x or "" for x in _strings(table, config.label_text_col)]
        extras = []
        for c in extra:
            if _is_list(table.column(c).type):
                values = table.column(c).to_pylist()
                extras.append([TEXT_SEPARATOR.join(str(x) for x in v if x is not None) if v else None
                               for v in values])
            else:
                extras.append(_strings(table, c))
        texts = []
        for i, label in enumerate(ids):
            parts = [display[i], *(e[i] for e in extras)]
            # A label without any text is still a label: its id is the only text we have.
            texts.append(TEXT_SEPARATOR.join(p for p in parts if p) or label)
        images = table.column(image_col[0]).to_pylist() if image_col else None
        groups = _strings(table, config.label_group_col) if config.label_group_col in table.column_names else None
        return cls(ids=ids, texts=texts, display=display, images=images, groups=groups)

    def to_arrow(self) -> pa.Table:
        columns = {"label": self.ids, "text": self.display, "encoder_text": self.texts}
        if self.exclusive is not None:
            columns["exclusive_group"] = pa.array(self.exclusive, type=pa.string())
        return pa.table(columns)

    @classmethod
    def from_arrow(cls, table: pa.Table) -> "LabelTable":
        exclusive = table.column("exclusive_group").to_pylist() if "exclusive_group" in table.column_names else None
        return cls(ids=table.column("label").to_pylist(), texts=table.column("encoder_text").to_pylist(),
                   display=table.column("text").to_pylist(), exclusive=exclusive)


@dataclass
class LabelledSet:
    """Products with their true labels: ``texts[i]`` has label indices ``labels[i]`` (int64 array).

    ``images[i]``: row i's image-column value (None: no image); ``images`` is None when images are not read.
    """

    ids: list[str]
    texts: list[str]
    labels: list[np.ndarray]
    skipped: dict[str, int]  # reason -> rows left out
    unknown_labels: int = 0  # label mentions not in the label table (dropped from their rows)
    images: list[Any] | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def label_counts(self, n_labels: int) -> np.ndarray:
        return np.bincount(np.concatenate(self.labels), minlength=n_labels) if self.labels else np.zeros(n_labels)


def load_labelled_set(path: str | Path, config: Config, labels: LabelTable) -> LabelledSet:
    """Rows of a training/dev catalog with known labels. Rows without text or labels are skipped and counted.

    With images wanted (``wants_images``) and an image column in the file, each kept row's image value is kept too.
    """
    path = Path(path)
    table = read_arrow(path, [config.id_col, *config.text_cols, config.labels_col], optional=_image_columns(config))
    image_col = [c for c in _image_columns(config) if c in table.column_names]
    label_type = table.column(config.labels_col).type
    if not _is_list(label_type):
        raise UserError(f"{path}: column {config.labels_col} must be a list of label ids, got {label_type}")
    row_ids = _strings(table, config.id_col)
    text_columns = [table.column(c).to_pylist() for c in config.text_cols]
    label_column = table.column(config.labels_col).to_pylist()
    image_column = table.column(image_col[0]).to_pylist() if image_col else None
    skipped = {"no text": 0, "no known label": 0}
    ids, texts, label_lists, images = [], [], [], []
    unknown = 0
    lookup = labels.index
    for row, row_id in enumerate(row_ids):
        text = product_text([column[row] for column in text_columns])
        if text is None:
            skipped["no text"] += 1
            continue
        row_labels = [str(x) for x in (label_column[row] or []) if x is not None]
        known = [lookup[x] for x in row_labels if x in lookup]
        unknown += len(row_labels) - len(known)
        if not known:
            skipped["no known label"] += 1
            continue
        ids.append(row_id)
        texts.append(text)
        label_lists.append(np.unique(np.array(known, dtype=np.int64)))
        if image_column is not None:
            images.append(image_column[row])
    if not texts:
        raise UserError(f"{path}: no usable rows (each needs text in {', '.join(config.text_cols)} and a label "
                        f"from the label table)")
    return LabelledSet(ids, texts, label_lists, {k: v for k, v in skipped.items() if v}, unknown,
                       images if image_column is not None else None)
