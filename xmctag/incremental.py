"""Incremental nights: ``tag --previous LAST`` reuses last night's predictions of products whose content is unchanged.

**Content hash.** Every prediction file ``tag`` writes has a ``content_hash`` per product (``content_hashes``): the
first 16 bytes (32 hex digits) of BLAKE2b over a canonical encoding of what the model reads of the product:

- its text as the tagger builds it (``xmctag.io.catalog.CatalogColumns.prepare``: the text columns stripped, the
  empty ones left out, joined with ``" ; "``), UTF-8;
- for bundles with image fusion, the value of the image column as it stands in the catalog: a path or URL string
  (not the picture behind it), inline bytes (the picture itself), a ``{"bytes", "path"}`` struct, or a list of
  those. So a new picture under an unchanged path or URL is *not* detected (hashing it would read every image of
  the catalog every night, the cost this feature avoids): publish changed pictures under a new URL (a versioned
  name), or run without ``--previous``.

The encoding is ``CONTENT_HASH`` (stored in the file's metadata as ``xmctag.content_hash``): a version byte, then
each field as a type byte, an 8-byte length and its bytes. It uses hashlib, which gives the same digest on every
machine and version (polars' ``hash`` does not promise that).

**Reuse.** ``Previous.open(path, settings)`` reads the previous file's settings (``xmctag.io.predictions``:
Parquet metadata or ``<file>.meta.json``) and compares them with this run's ``settings`` (the metadata ``tag``
writes, minus the keys that do not change a product's predictions: ``IGNORED_SETTINGS``). Any difference (another
bundle id, ``top_k``, ``min_score``, graph precision, exclusive groups, evidence, xmctag version, content-hash
scheme, or a file that records none of these) means nothing is reused: a warning says why,
and every product is tagged (a nightly job keeps running after a re-export; its output is still right). A file that
cannot be read as predictions (wrong types, an id in two products, labels the bundle does not have) is a
``UserError`` naming it. A CSV written with ``--escape-formulas`` is never reused (escaping is not reversible).

``Previous.split(batch)`` joins a prepared catalog batch (``id``, ``text``, ``content_hash``, ...) against the
previous products on ``id`` (a binary search in the id-sorted previous products, so a batch costs its own size, not
the file's): a row whose id is there with the same content hash is **reused** (its labels, scores
and evidence are copied), every other row is tagged: **re-tagged** when its id is known but its content changed,
**new** otherwise. ``merge`` puts the tagged and reused rows back in catalog order, so the output is what a full run
writes (the scores of reused rows are last night's float32 values, identical to tonight's for the same bundle,
settings and content). **Dropped**: ids of the previous file that no row of tonight's catalog tagged or reused (gone
from the catalog, or now skipped for want of an id or text). Memory: the previous file's products (ids, hashes,
labels, scores) are held while the catalog streams; one boolean per previous product marks the ones seen.

CSV/JSONL note: a product left without labels by ``--min-score`` has no rows there, so the next night tags it
again (counted as new).
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl

from xmctag.errors import UserError

CONTENT_HASH = "blake2b-128/1"  # the scheme: bump when the encoding changes (old files are then not reused)
# Where and when, not what: these do not change a product's predictions (escape_formulas: checked on its own).
IGNORED_SETTINGS = ("bundle", "catalog", "catalog_sha256", "tagged_at", "escape_formulas")
_TEXT, _NONE, _BYTES, _STRING, _LIST, _DICT, _OTHER = b"T", b"N", b"B", b"S", b"L", b"D", b"O"


def _field(kind: bytes, data: bytes) -> bytes:
    return kind + len(data).to_bytes(8, "little") + data


def _encode_image(value) -> bytes:
    """Canonical bytes of an image-column value (None, bytes, str, dict, list, or anything else by its str)."""
    if value is None:
        return _field(_NONE, b"")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _field(_BYTES, bytes(value))
    if isinstance(value, str):
        return _field(_STRING, value.encode("utf-8", "surrogatepass"))
    if isinstance(value, dict):
        return _field(_DICT, b"".join(_field(_STRING, str(k).encode("utf-8", "surrogatepass")) + _encode_image(v)
                                      for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))))
    if isinstance(value, (list, tuple)):
        return _field(_LIST, b"".join(_encode_image(v) for v in value))
    return _field(_OTHER, str(value).encode("utf-8", "surrogatepass"))


def content_hashes(texts: list[str], images: list | None = None) -> list[str]:
    """The content hash of each product (module docstring): its prepared text and, for fused bundles
    (``images`` not None), its image-column value."""
    version = b"\x01"
    if images is None:
        return [hashlib.blake2b(version + _field(_TEXT, t.encode("utf-8", "surrogatepass")), digest_size=16)
                .hexdigest() for t in texts]
    return [hashlib.blake2b(version + _field(_TEXT, t.encode("utf-8", "surrogatepass")) + _encode_image(image),
                            digest_size=16).hexdigest() for t, image in zip(texts, images)]


def with_content_hash(batch: pl.DataFrame, fused: bool) -> pl.DataFrame:
    """A prepared catalog batch (``id``, ``text`` [, ``image``]) with its ``content_hash`` column; ``fused``: the
    bundle reads images (a batch without the image column hashes as if every image were null)."""
    images = None
    if fused:
        images = batch["image"].to_list() if "image" in batch.columns else [None] * len(batch)
    return batch.with_columns(content_hash=pl.Series(content_hashes(batch["text"].to_list(), images),
                                                     dtype=pl.String))


@dataclass
class IncrementalCounts:
    """What ``tag --previous`` did with each row (``TagSummary.incremental``)."""

    previous: str
    used: bool = True  # False: the previous file was not reused (``reason``), every row was tagged
    reason: str | None = None
    reused: int = 0
    retagged: int = 0  # id in the previous file, content changed
    new: int = 0  # id not in the previous file
    dropped: int = 0  # ids of the previous file that no row of this catalog tagged or reused

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        """The CLI's summary line."""
        if not self.used:
            return f"--previous {self.previous} not reused ({self.reason}): every product tagged"
        return (f"--previous {self.previous}: {self.reused} rows reused, {self.retagged} re-tagged (content changed), "
                f"{self.new} new, {self.dropped} dropped (ids no longer in the catalog)")


def settings_difference(previous: dict[str, str] | None, current: dict) -> str | None:
    """Why predictions written with ``previous`` settings are not this run's (None: they are)."""
    if previous is None:
        return "it has no settings file (<file>.meta.json) saying which bundle and settings made it"
    if previous.get("escape_formulas") == "True":
        return "it is a CSV written with --escape-formulas, which changes ids and labels irreversibly"
    current = {k: str(v) for k, v in current.items()}
    for key in sorted((set(previous) | set(current)) - set(IGNORED_SETTINGS)):
        if previous.get(key) != current.get(key):
            if key == "content_hash" and key not in previous:
                return "it has no content hashes (written by an xmctag from before 2026-12-03)"
            return f"its {key} is {previous.get(key, '(not recorded)')}, this run's is {current.get(key, '(none)')}"
    return None


class Previous:
    """The previous night's products, ready to be joined against catalog batches (see the module docstring)."""

    def __init__(self, path: Path, products: pl.DataFrame, counts: IncrementalCounts):
        self.path = path
        self.products = products  # sorted by id: id, prev_hash, labels, scores [, evidence_ids, evidence_scores]
        self.ids = products["id"].set_sorted()
        self.seen = np.zeros(len(products), dtype=bool)
        self.counts = counts

    @classmethod
    def open(cls, path: str | Path, settings: dict, label_ids: np.ndarray) -> Previous | NotReused:
        """The previous predictions at ``path`` if they can be reused under ``settings`` (the metadata this run
        writes), else, after a warning saying why, a ``NotReused`` (its ``counts`` record the reason).
        ``label_ids``: the bundle's labels; a file naming another label is an error."""
        from xmctag.io.predictions import read_prediction_metadata, read_prediction_products

        path = Path(path)
        recorded = read_prediction_metadata(path)
        reason = settings_difference(recorded, settings)
        if reason is not None:
            warnings.warn(f"--previous {path}: not reused, {reason}; tagging every product", stacklevel=3)
            return NotReused(path, reason)
        products = read_prediction_products(path)
        if ("evidence_ids" in products.columns) != (int(settings.get("evidence", 0)) > 0):
            raise UserError(f"{path}: its evidence columns do not match its recorded evidence setting "
                            f"{recorded.get('evidence')}")
        known = pl.Series(label_ids.tolist(), dtype=pl.String)
        unknown = products["labels"].explode().drop_nulls()
        unknown = unknown.filter(~unknown.is_in(known.implode()))
        if len(unknown):
            raise UserError(f"{path}: label {unknown[0]!r} is not a label of the bundle that it says made it "
                            f"({settings.get('bundle_id')}); a modified prediction file")
        if products["labels"].list.len().ne(products["scores"].list.len()).any():
            raise UserError(f"{path}: a product has a different number of labels and scores")
        # Sorted by id: each batch finds its rows by binary search (a join would hash the whole file per batch).
        products = products.rename({"content_hash": "prev_hash"}).sort("id")
        return cls(path, products, IncrementalCounts(str(path)))

    def split(self, batch: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
        """``batch`` (prepared, with ``content_hash``) -> (the rows to tag, with their position ``_pos`` in the
        batch; the reused rows: ``_pos`` and the previous file's product columns)."""
        if len(self.ids):
            rows = self.ids.search_sorted(batch["id"], side="left").clip(0, len(self.ids) - 1)
            known = (self.ids.gather(rows) == batch["id"]).fill_null(False)
            found = self.products.drop("id").gather(rows)
        else:  # an empty previous file: every row is new
            rows, known = pl.Series([0] * len(batch), dtype=pl.UInt32), pl.Series([False] * len(batch))
            found = self.products.drop("id").clear(len(batch))
        joined = pl.concat([batch.with_row_index("_pos"), found], how="horizontal")
        same = known & (joined["prev_hash"] == joined["content_hash"]).fill_null(False)
        self.seen[rows.filter(known).to_numpy()] = True
        n_known, n_same = int(known.sum()), int(same.sum())
        self.counts.reused += n_same
        self.counts.retagged += n_known - n_same
        self.counts.new += len(batch) - n_known
        to_tag = joined.filter(~same).select("_pos", *batch.columns)
        reused = joined.filter(same).select("_pos", "id", "labels", "scores", "content_hash",
                                            *[c for c in ("evidence_ids", "evidence_scores") if c in joined.columns])
        return to_tag, reused

    def finish(self) -> IncrementalCounts:
        self.counts.dropped = int((~self.seen).sum())
        return self.counts


class NotReused:
    """A previous file that is not reused: every row is tagged (``counts.used`` False, the reason, no counts)."""

    def __init__(self, path: Path, reason: str):
        self.counts = IncrementalCounts(str(path), used=False, reason=reason)

    def finish(self) -> IncrementalCounts:
        return self.counts


def reused_products(reused: pl.DataFrame, label_ids: pl.Series, label_texts: pl.Series) -> pl.DataFrame:
    """Reused rows from ``Previous.split`` as writer rows (``xmctag.io.writers.PRODUCT_SCHEMA``): their label texts
    from the bundle's label table."""
    return reused.with_columns(label_texts=pl.col("labels").list.eval(
        pl.element().replace_strict(label_ids, label_texts, default=None)))


def coalesced(parts, batch_size: int, max_rows: int):
    """Consecutive catalog batches after ``Previous.split``, ``(rows read, rows to tag, skipped by reason, reused,
    first row)`` each, merged into groups whose rows to tag reach ``batch_size`` (or whose rows read reach
    ``max_rows``, which bounds the reused rows held): with 2 % of the rows changed, a catalog batch has a few dozen
    to tag, and the encoder and searches cost less per row in larger calls. ``_pos`` counts across the group."""
    pending: list = []
    for part in parts:
        pending.append(part)
        if sum(len(p[1]) for p in pending) >= batch_size or sum(p[0] for p in pending) >= max_rows:
            yield _merged(pending)
            pending = []
    if pending:
        yield _merged(pending)


def _merged(parts: list):
    if len(parts) == 1:
        return parts[0]
    to_tag, reused, skipped, offset = [], [], {}, 0
    for _, batch, part_skipped, part_reused, _ in parts:
        to_tag.append(batch.with_columns(pl.col("_pos") + offset))
        reused.append(part_reused.with_columns(pl.col("_pos") + offset))
        offset += len(batch) + len(part_reused)
        for reason, n in part_skipped.items():
            skipped[reason] = skipped.get(reason, 0) + n
    return sum(p[0] for p in parts), pl.concat(to_tag), skipped, pl.concat(reused), parts[0][4]


def merge(tagged: pl.DataFrame, reused: pl.DataFrame) -> pl.DataFrame:
    """Tagged and reused writer rows (each with ``_pos``) in batch order, ``_pos`` dropped."""
    columns = [c for c in tagged.columns if c != "_pos"]
    return pl.concat([tagged.select("_pos", *columns), reused.select("_pos", *columns)]).sort("_pos").drop("_pos")
