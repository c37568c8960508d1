"""``xmctag diff OLD NEW``: what changed between two prediction files (say, last night's and tonight's).

Inputs: any two files ``xmctag tag`` writes, in any mix of formats (Parquet, CSV, JSON Lines), read by
``xmctag.io.predictions`` (one prediction list per product: a repeated id, or scores that do not match the labels, is
an error naming the file), with their provenance (Parquet metadata, or the ``.meta.json`` sidecar of CSV/JSONL). A
product without labels (``--min-score`` cut them all) is a row with an empty list in Parquet but has no row in
CSV/JSONL; so that a change of format does not count such products as removed or added, a Parquet file compared
with a CSV/JSONL one is taken without them (a note says how many).

The report (``DiffReport``): ``to_dict()`` is the JSON of ``xmctag diff --json``, and the terminal table
(``xmctag.reports.table``) and the HTML page (``xmctag.reports.html``) are rendered from that same dict, so their
numbers cannot disagree. Its keys:

- ``old`` / ``new``: each file's ``path``, ``format``, ``products``, ``pairs`` ((product, label) pairs), ``labels``
  (distinct), ``has_scores`` and provenance (``bundle_id``, ``bundle``, ``tagged_at``, ``xmctag_version``, ``top_k``,
  ``min_score``, ``catalog``; null when the file does not record it); ``bundle_changed``: whether the bundle ids
  differ (null when either file records none).
- ``products``: ``old``, ``new``, ``added`` (id only in NEW), ``removed`` (id only in OLD), ``common``, ``retagged``
  (common, label set changed), ``unchanged`` (common, same label set; ``reordered``: how many of those in another
  order), ``top1_changed`` (common, another best label), ``mean_jaccard`` (mean of |A ∩ B| / |A ∪ B| over the common
  products' label sets, 1 for two empty sets; null without common products).
- ``labels``: distinct labels in ``old`` and ``new``, ``appeared`` (only in NEW), ``disappeared`` (only in OLD),
  ``gains`` / ``losses`` ((product, label) pairs that common products gained / lost), ``changed`` (labels with a gain
  or a loss).
- ``top_gainers`` / ``top_losers``: the ``top`` labels whose product count rose / fell most: ``label``, ``old`` and
  ``new`` (products with it in each file), ``change`` (``new`` - ``old``), ``gained`` / ``lost`` (common products
  that gained / lost it); by ``change``, ties by label id.
- ``scores``: for ``all`` (every score returned) and ``top1`` (each product's best score): ``old`` / ``new``
  (``count``, ``mean``, ``std``, ``min``, ``p05``, ``p25``, ``p50``, ``p75``, ``p95``, ``max``, of the scores rounded
  to 6 decimals, as float32 scores are; the numbers are null when ``count`` is 0, the whole entry for a file without
  scores) and ``histogram``: ``edges`` (21 bin edges
  shared by both files, 0 to 1 in steps of 0.05 when every score is in [0, 1], else the scores' range), ``old`` /
  ``new`` (counts per bin; each sums to its ``count``).
- ``examples``: up to ``top`` ids each of ``added`` and ``removed``, and up to ``top`` ``retagged`` products with the
  labels they ``gained`` and ``lost`` (by id).
- ``notes``: what the reader should know, one line each (no product in common, files that look swapped, a changed
  ``top_k`` or ``min_score``, a file without scores, ...); ``top``: the ``top`` asked for.

Everything is computed with polars expressions over whole columns (no Python loop over rows).
"""

from __future__ import annotations

import datetime
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from xmctag.errors import UserError
from xmctag.io.predictions import prediction_format, read_prediction_file, read_prediction_metadata

BINS = 20
SCORE_DECIMALS = 6
QUANTILES = {"p05": 0.05, "p25": 0.25, "p50": 0.5, "p75": 0.75, "p95": 0.95}
PROVENANCE = ("bundle_id", "bundle", "tagged_at", "xmctag_version", "top_k", "min_score", "catalog")


@dataclass
class FileSide:
    """One input file: what it holds and what it says made it."""

    path: str
    format: str
    products: int
    pairs: int
    labels: int
    has_scores: bool
    bundle_id: str | None = None
    bundle: str | None = None
    tagged_at: str | None = None
    xmctag_version: str | None = None
    top_k: str | None = None
    min_score: str | None = None
    catalog: str | None = None


@dataclass
class ProductChanges:
    old: int
    new: int
    added: int
    removed: int
    common: int
    retagged: int
    unchanged: int
    reordered: int
    top1_changed: int
    mean_jaccard: float | None


@dataclass
class LabelChanges:
    old: int
    new: int
    appeared: int
    disappeared: int
    gains: int
    losses: int
    changed: int


@dataclass
class LabelMove:
    label: str
    old: int
    new: int
    change: int
    gained: int
    lost: int


@dataclass
class ScoreStats:
    count: int
    mean: float | None
    std: float | None
    min: float | None
    p05: float | None
    p25: float | None
    p50: float | None
    p75: float | None
    p95: float | None
    max: float | None


@dataclass
class Histogram:
    edges: list[float]
    old: list[int]
    new: list[int]


@dataclass
class ScoreShift:
    old: ScoreStats | None
    new: ScoreStats | None
    histogram: Histogram


@dataclass
class Retagged:
    id: str
    gained: list[str]
    lost: list[str]


@dataclass
class Examples:
    added: list[str]
    removed: list[str]
    retagged: list[Retagged]


@dataclass
class DiffReport:
    """What changed from ``old`` to ``new`` (see the module docstring for every field)."""

    old: FileSide
    new: FileSide
    bundle_changed: bool | None
    products: ProductChanges
    labels: LabelChanges
    top_gainers: list[LabelMove]
    top_losers: list[LabelMove]
    scores: dict[str, ScoreShift]
    examples: Examples
    top: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """The report as JSON-ready data (what every rendering reads)."""
        return asdict(self)


def diff_predictions(old: str | Path, new: str | Path, top: int = 10) -> DiffReport:
    """What changed from prediction file ``old`` to ``new``; ``top``: label movers and examples listed."""
    if top < 1:
        raise UserError(f"--top must be at least 1, not {top}")
    notes: list[str] = []
    old_frame, old_side = _read(Path(old), "OLD", notes)
    new_frame, new_side = _read(Path(new), "NEW", notes)
    if (old_side.format == "parquet") != (new_side.format == "parquet"):
        old_frame, new_frame = (_without_empty(frame, side, which, notes) for frame, side, which in (
            (old_frame, old_side, "OLD"), (new_frame, new_side, "NEW")))
    old_ids, new_ids = old_frame.select("id"), new_frame.select("id")
    added, removed = new_ids.join(old_ids, on="id", how="anti"), old_ids.join(new_ids, on="id", how="anti")
    changes = _compare(old_frame.select("id", "labels").join(new_frame.select("id", "labels"), on="id", how="inner",
                                                             suffix="_new"))
    counts = changes.select(pl.col("retagged").sum(), (~pl.col("retagged") & pl.col("reordered")).sum().alias("r"),
                            pl.col("top1_changed").sum(), pl.col("jaccard").mean()).row(0)
    retagged, reordered, top1_changed = (int(x or 0) for x in counts[:3])
    products = ProductChanges(old=old_frame.height, new=new_frame.height, added=added.height, removed=removed.height,
                              common=changes.height, retagged=retagged, unchanged=changes.height - retagged,
                              reordered=reordered, top1_changed=top1_changed,
                              mean_jaccard=None if counts[3] is None else float(counts[3]))
    per_label = _per_label(old_frame, new_frame, changes)
    old_side.labels, new_side.labels = int((per_label["old"] > 0).sum()), int((per_label["new"] > 0).sum())
    labels = LabelChanges(
        old=old_side.labels, new=new_side.labels,
        appeared=int(((per_label["old"] == 0) & (per_label["new"] > 0)).sum()),
        disappeared=int(((per_label["old"] > 0) & (per_label["new"] == 0)).sum()),
        gains=int(per_label["gained"].sum()), losses=int(per_label["lost"].sum()),
        changed=int(((per_label["gained"] > 0) | (per_label["lost"] > 0)).sum()))
    gainers = per_label.filter(pl.col("change") > 0).sort(["change", "label"], descending=[True, False]).head(top)
    losers = per_label.filter(pl.col("change") < 0).sort(["change", "label"]).head(top)
    examples = Examples(
        added=added["id"].sort().head(top).to_list(), removed=removed["id"].sort().head(top).to_list(),
        retagged=[Retagged(**row) for row in changes.filter("retagged").sort("id").head(top)
                  .select("id", "gained", "lost").iter_rows(named=True)])  # at most `top` rows
    bundle_changed = (None if old_side.bundle_id is None or new_side.bundle_id is None
                      else old_side.bundle_id != new_side.bundle_id)
    notes += _provenance_notes(old_side, new_side, products)
    return DiffReport(old=old_side, new=new_side, bundle_changed=bundle_changed, products=products, labels=labels,
                      top_gainers=_moves(gainers), top_losers=_moves(losers),
                      scores=_score_shifts(old_frame, new_frame, old_side, new_side), examples=examples, top=top,
                      notes=notes)


def _read(path: Path, which: str, notes: list[str]) -> tuple[pl.DataFrame, FileSide]:
    frame, source = read_prediction_file(path, scores=True)
    metadata = read_prediction_metadata(path) or {}
    # A null label list (a hand-made file) is an empty one; a label listed twice for a product counts once.
    frame = frame.with_columns(pl.col("labels").fill_null(pl.lit([], pl.List(pl.String))).list.unique(
        maintain_order=True))
    has_scores = frame.height == 0 or frame["scores"].null_count() < frame.height
    pairs = int(frame["labels"].list.len().sum() or 0)
    provenance = {key: metadata.get(key) or None for key in PROVENANCE}
    provenance["bundle_id"] = source.bundle_id or provenance["bundle_id"]
    provenance["bundle"] = source.bundle or provenance["bundle"]
    if source.note:
        notes.append(f"{which} {path}: {source.note}, so it names no bundle")
        provenance["bundle_id"] = provenance["bundle"] = None
    if not has_scores:
        notes.append(f"{which} {path} has no scores: its score statistics are empty")
    side = FileSide(path=str(path), format=prediction_format(path), products=frame.height, pairs=pairs,
                    labels=0, has_scores=has_scores, **provenance)  # labels: set by diff_predictions
    return frame, side


def _without_empty(frame: pl.DataFrame, side: FileSide, which: str, notes: list[str]) -> pl.DataFrame:
    """A Parquet file without its products that have no label, when the other file is CSV/JSONL (where such a
    product has no row): otherwise each would count as removed or added."""
    if side.format != "parquet":
        return frame
    kept = frame.filter(pl.col("labels").list.len() > 0)
    if kept.height < frame.height:
        notes.append(f"{which} is Parquet and the other file CSV/JSONL, which has no row for a product without labels: "
                     f"the {frame.height - kept.height} products of {which} without labels are left out")
        side.products = kept.height
    return kept


def _compare(common: pl.DataFrame) -> pl.DataFrame:
    """Per product in both files (``labels``, ``labels_new``: unique lists): the labels it ``gained`` and ``lost``,
    whether it was ``retagged`` (either is non-empty: cheaper than sorting both lists to compare them, see
    bench/RESULTS.md), ``reordered``, whether its best label changed (``top1_changed``), its ``jaccard``."""
    return common.select(
        "id", "labels", "labels_new",
        reordered=pl.col("labels") != pl.col("labels_new"),
        top1_changed=pl.col("labels").list.first().ne_missing(pl.col("labels_new").list.first()),
        gained=pl.col("labels_new").list.set_difference(pl.col("labels")),
        lost=pl.col("labels").list.set_difference(pl.col("labels_new")),
    ).with_columns(
        retagged=(pl.col("gained").list.len() > 0) | (pl.col("lost").list.len() > 0),
        jaccard=_jaccard(pl.col("labels").list.len(), pl.col("labels_new").list.len(), pl.col("lost").list.len()))


def _jaccard(old: pl.Expr, new: pl.Expr, lost: pl.Expr) -> pl.Expr:
    """|A ∩ B| / |A ∪ B| from the sizes of unique lists A (old), B (new) and A \\ B (lost); 1 for two empty sets."""
    union = new + lost
    return pl.when(union == 0).then(1.0).otherwise((old - lost) / union)


def _label_counts(labels: pl.Series, name: str) -> pl.DataFrame:
    """Products per label (the lists are unique per product)."""
    return (labels.explode().drop_nulls().alias("label").to_frame().group_by("label").len(name=name)
            .with_columns(pl.col(name).cast(pl.Int64)))


def _per_label(old: pl.DataFrame, new: pl.DataFrame, changes: pl.DataFrame) -> pl.DataFrame:
    """label, old, new, change, gained, lost: one row per label in either file."""
    table = _label_counts(old["labels"], "old").join(_label_counts(new["labels"], "new"), on="label", how="full",
                                                     coalesce=True)
    for name in ("gained", "lost"):
        table = table.join(_label_counts(changes[name], name), on="label", how="left")
    return (table.with_columns(pl.col("old", "new", "gained", "lost").fill_null(0))
            .with_columns(change=pl.col("new") - pl.col("old"))
            .select("label", "old", "new", "change", "gained", "lost"))


def _moves(frame: pl.DataFrame) -> list[LabelMove]:
    return [LabelMove(**row) for row in frame.iter_rows(named=True)]  # at most `top` rows


def _score_shifts(old: pl.DataFrame, new: pl.DataFrame, old_side: FileSide,
                  new_side: FileSide) -> dict[str, ScoreShift]:
    # Scores are float32 in the files: rounded to 6 decimals, 0.7 is 0.7 (not 0.69999998, one bin lower).
    values = {"all": (old["scores"].explode(), new["scores"].explode()),
              "top1": (old["scores"].list.first(), new["scores"].list.first())}
    values = {kind: tuple(v.drop_nulls().round(SCORE_DECIMALS) for v in pair) for kind, pair in values.items()}
    edges = _edges(pl.concat([*values["all"]]))
    shifts = {}
    for kind, (old_values, new_values) in values.items():
        histogram = Histogram(edges=edges.tolist(), old=_counts(old_values, edges), new=_counts(new_values, edges))
        shifts[kind] = ScoreShift(old=_stats(old_values) if old_side.has_scores else None,
                                  new=_stats(new_values) if new_side.has_scores else None, histogram=histogram)
    return shifts


def _edges(scores: pl.Series) -> np.ndarray:
    """Bin edges shared by both files: 0-1 in steps of 1/BINS when every score is in [0, 1], else their range."""
    low, high = (scores.min(), scores.max()) if len(scores) else (0.0, 1.0)
    if low >= 0.0 and high <= 1.0:
        low, high = 0.0, 1.0
    elif low == high:
        low, high = low - 0.5, high + 0.5
    return np.round(np.linspace(float(low), float(high), BINS + 1), 12)


def _counts(values: pl.Series, edges: np.ndarray) -> list[int]:
    # np.histogram's last bin includes its right edge, so every value (all within the edges) is counted once.
    return np.histogram(values.to_numpy(), bins=edges)[0].astype(int).tolist()


def _stats(values: pl.Series) -> ScoreStats:
    if len(values) == 0:
        return ScoreStats(count=0, **dict.fromkeys(("mean", "std", "min", *QUANTILES, "max")))
    def rounded(x) -> float:
        return round(float(x), SCORE_DECIMALS)

    array = values.to_numpy()
    # one pass for all quantiles (linear interpolation, as polars' "linear" and numpy's default)
    quantiles = dict(zip(QUANTILES, np.quantile(array, list(QUANTILES.values())).tolist()))
    return ScoreStats(count=len(array), mean=rounded(array.mean()), std=rounded(array.std()), min=rounded(array.min()),
                      max=rounded(array.max()), **{name: rounded(q) for name, q in quantiles.items()})


def _provenance_notes(old: FileSide, new: FileSide, products: ProductChanges) -> list[str]:
    notes = []
    if Path(old.path).resolve() == Path(new.path).resolve():
        notes.append("OLD and NEW are the same file")
    if products.common == 0 and products.old and products.new:
        notes.append("no product id is in both files: every product counts as removed and added (another catalog?)")
    old_time, new_time = _timestamp(old.tagged_at), _timestamp(new.tagged_at)
    if old_time is not None and new_time is not None and old_time > new_time:
        notes.append(f"OLD was tagged after NEW ({old.tagged_at} > {new.tagged_at}): are the files swapped?")
    for key in ("top_k", "min_score"):
        before, after = getattr(old, key), getattr(new, key)
        if before is not None and after is not None and before != after:
            notes.append(f"{key} changed from {before} to {after}: label counts change with it")
    return notes


def _timestamp(value: str | None) -> datetime.datetime | None:
    try:
        moment = datetime.datetime.fromisoformat(value) if value else None
    except ValueError:
        return None
    if moment is not None and moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment
