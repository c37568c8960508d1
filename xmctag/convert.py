"""``xmctag convert``: Extreme Classification Repository raw datasets -> xmctag's data contract.

Input directory (names as in the repository's "raw text" releases, e.g. LF-AmazonTitles-131K; ``.gz`` optional,
``trn.json.gz`` accepted for ``trn.raw.json.gz``):

- ``trn.raw.json.gz`` / ``tst.raw.json.gz``: one JSON object per line, ``uid``, ``title``, optional ``content``,
  ``target_ind`` (0-based line numbers in the label file);
- ``lbl.raw.json.gz``: one JSON object per line, ``uid``, ``title``.

Output: ``train.parquet`` / ``test.parquet`` with ``id``, ``title``, ``description`` (null where a row has no
``content``), ``labels`` (label uids); ``labels.parquet`` with ``label`` (uid) and ``text`` (title).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import polars as pl

from xmctag.errors import UserError

SPLITS = {"trn": "train.parquet", "tst": "test.parquet"}
CHUNK_ROWS = 200_000


def convert_xc_raw(source: str | Path, out: str | Path) -> dict[str, int]:
    """Converts what is in ``source``; returns rows written per output file name."""
    source, out = Path(source), Path(out)
    if not source.is_dir():
        raise UserError(f"{source}: not a directory")
    label_file = _find(source, "lbl")
    if label_file is None:
        raise UserError(f"{source}: no lbl.raw.json[.gz] (label file) found")
    label_uids, label_texts = [], []
    for line_no, record in _records(label_file):
        uid = record.get("uid")
        if uid is None:
            raise UserError(f"{label_file}: line {line_no} has no uid")
        label_uids.append(str(uid))
        label_texts.append(str(record.get("title") or ""))
    out.mkdir(parents=True, exist_ok=True)
    written = {"labels.parquet": len(label_uids)}
    pl.DataFrame({"label": label_uids, "text": label_texts}).write_parquet(out / "labels.parquet")
    found_split = False
    for prefix, name in SPLITS.items():
        path = _find(source, prefix)
        if path is not None:
            found_split = True
            written[name] = _convert_split(path, label_uids, out / name)
    if not found_split:
        raise UserError(f"{source}: no trn.raw.json[.gz] or tst.raw.json[.gz] found")
    return written


def _convert_split(path: Path, label_uids: list[str], target: Path) -> int:
    """Streams one split into ``target`` in chunks (bounded memory on million-row files), atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("id", pa.string()), ("title", pa.string()), ("description", pa.string()),
                        ("labels", pa.list_(pa.string()))])
    tmp = target.with_name(f".{target.name}.tmp")
    total = 0
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            rows = {name: [] for name in schema.names}
            for line_no, record in _records(path):
                try:
                    targets = [label_uids[int(i)] for i in record.get("target_ind", [])]
                except (IndexError, ValueError):
                    raise UserError(f"{path}: line {line_no}: target_ind refers to a label the label file does "
                                    f"not have ({len(label_uids)} labels)") from None
                rows["id"].append(str(record.get("uid", line_no)))
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
    return total


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
