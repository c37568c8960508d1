"""``xmctag convert``: Extreme Classification Repository raw datasets -> xmctag's data contract.

Input directory (names as in the repository's "raw text" releases, e.g. LF-AmazonTitles-131K; ``.gz`` optional,
``trn.json.gz`` accepted for ``trn.raw.json.gz``):

- ``trn.raw.json.gz`` / ``tst.raw.json.gz``: one JSON object per line, ``uid``, ``title``, optional ``content``,
  ``target_ind`` (0-based line numbers in the label file);
- ``lbl.raw.json.gz``: one JSON object per line, ``uid``, ``title``.

Output: ``train.parquet`` / ``test.parquet`` with ``id``, ``title``, ``description`` (null where a row has no
``content``), ``labels`` (label uids); ``labels.parquet`` with ``label`` (uid) and ``text`` (title).

A product line whose uid an earlier line of the same split already had is skipped and counted (``xmctag eval``
needs one truth row per id); a label uid that occurs twice, or a ``target_ind`` that is not a list of label line
numbers, is an error naming the file and line.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from xmctag.errors import UserError

SPLITS = {"trn": "train.parquet", "tst": "test.parquet"}
CHUNK_ROWS = 200_000


@dataclass
class Conversion:
    """What ``convert_xc_raw`` wrote: rows per output file name, and duplicate-uid lines skipped per split file."""

    written: dict[str, int] = field(default_factory=dict)
    duplicates_skipped: dict[str, int] = field(default_factory=dict)


def convert_xc_raw(source: str | Path, out: str | Path) -> Conversion:
    """Converts what is in ``source`` into ``out``."""
    source, out = Path(source), Path(out)
    if not source.is_dir():
        raise UserError(f"{source}: not a directory")
    label_file = _find(source, "lbl")
    if label_file is None:
        raise UserError(f"{source}: no lbl.raw.json[.gz] (label file) found")
    label_uids, label_texts, first_line = [], [], {}
    for line_no, record in _records(label_file):
        uid = record.get("uid")
        if uid is None:
            raise UserError(f"{label_file}: line {line_no} has no uid")
        uid = str(uid)
        if uid in first_line:  # target_ind counts lines, so two lines with one uid would be two labels with one id
            raise UserError(f"{label_file}: line {line_no}: label uid {uid!r} already on line {first_line[uid]}")
        first_line[uid] = line_no
        label_uids.append(uid)
        label_texts.append(str(record.get("title") or ""))
    out.mkdir(parents=True, exist_ok=True)
    result = Conversion(written={"labels.parquet": len(label_uids)})
    pl.DataFrame({"label": label_uids, "text": label_texts}).write_parquet(out / "labels.parquet")
    found_split = False
    for prefix, name in SPLITS.items():
        path = _find(source, prefix)
        if path is not None:
            found_split = True
            result.written[name], result.duplicates_skipped[name] = _convert_split(path, label_uids, out / name)
    if not found_split:
        raise UserError(f"{source}: no trn.raw.json[.gz] or tst.raw.json[.gz] found")
    return result


def _convert_split(path: Path, label_uids: list[str], target: Path) -> tuple[int, int]:
    """Streams one split into ``target`` in chunks (bounded memory on million-row files), atomically; returns the
    rows written and the duplicate-uid lines skipped."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("id", pa.string()), ("title", pa.string()), ("description", pa.string()),
                        ("labels", pa.list_(pa.string()))])
    tmp = target.with_name(f".{target.name}.tmp")
    total, seen, duplicates = 0, set(), 0
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            rows = {name: [] for name in schema.names}
            for line_no, record in _records(path):
                targets = [label_uids[i] for i in _target_indices(record, len(label_uids), path, line_no)]
                uid = str(record.get("uid", line_no))
                if uid in seen:
                    duplicates += 1
                    continue
                seen.add(uid)
                rows["id"].append(uid)
                rows["title"].append(record.get("title"))
                rows["description"].append(record.get("content") or None)
                rows["labels"].append(targets)
                if len(rows["id"]) >= CHUNK_ROWS:
                    writer.write_table(pa.table(rows, schema=schema))
                    total += len(rows["id"])
                    rows = {name: [] for name in schema.names}
            writer.write_table(pa.table(rows, schema=schema))
            total += len(rows["id"])
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return total, duplicates


def _target_indices(record: dict, n_labels: int, path: Path, line_no: int) -> list[int]:
    """``record["target_ind"]`` checked: a list of whole numbers in ``[0, n_labels)`` (Python would read -1 as the
    last label, silently)."""
    indices = record.get("target_ind", [])
    if not isinstance(indices, list):
        raise UserError(f"{path}: line {line_no}: target_ind must be a list of label line numbers, "
                        f"not {type(indices).__name__}")
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_labels:
            raise UserError(f"{path}: line {line_no}: target_ind {i!r} refers to a label the label file does not "
                            f"have (0-based line numbers, {n_labels} labels)")
    return indices


def _find(source: Path, prefix: str) -> Path | None:
    for name in (f"{prefix}.raw.json.gz", f"{prefix}.raw.json", f"{prefix}.json.gz", f"{prefix}.json"):
        if (source / name).is_file():
            return source / name
    return None


def _records(path: Path):
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield line_no, json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}: line {line_no} is not valid JSON ({e.msg})") from None
    except (OSError, EOFError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None
