"""Calibrated thresholds: per label, the score above which its predictions reach a target precision.

``calibrate(bundle, dev, precision=0.9)`` (``xmctag calibrate BUNDLE --dev DEV --precision 0.9``):

1. **Tag the dev catalog** with the bundle's ``Tagger`` at a generous ``top_k`` (default 20), so that thresholds
   have predictions to cut. The dev catalog is a Parquet file with the bundle's text columns (and, for an image
   bundle, optionally its image column) and a list-of-strings labels column (the bundle's ``labels_col``, as in
   training); ids are not needed. It is read whole (dev sets are small; the scores kept are rows x ``top_k``).
   Rows without text are skipped (counted); truth labels that are not in the bundle's label table count for recall
   but can never be predicted (counted).
2. **Split** the tagged rows in two halves with a seeded permutation (``split_rows``): thresholds are fitted on the
   *fit* half only, and everything the report promises is measured on the other, *held-out* half.
3. **Fit** one threshold per label (``fit_thresholds``). A group of predictions (each a score, correct or not) gets
   the lowest score ``s`` at which ``correct(>= s) / (predictions(>= s) + 1) >= target``: the precision of the
   predictions scoring at least ``s``, with one pseudo-wrong prediction added so that a group of few predictions
   must earn its threshold (5 correct of 5 is 0.83, not 1.0); ``s`` runs over the group's distinct scores (ties
   are kept or dropped together), and a group where no ``s`` qualifies gets ``+inf`` (never kept). Label ``l`` is
   its own group when the fit half has at least ``min_positives`` products with ``l`` among their true labels and
   at least ``min_positives`` predictions of ``l``; the other labels share the group of their training-frequency
   band (the label table's ``train_count``: ``<= bands[0]``, ``<= bands[1]``, ..., above), made of their
   predictions, when that has as many positives and predictions; the rest share one global group (their
   predictions; all predictions when they have fewer than ``min_positives``). So on the fit half the labels kept
   reach the target precision in every group, hence overall, except where that last fallback was taken.
4. **Measure** on the held-out half (``measure``): precision and (micro) recall of the labels kept, labels per
   product, the share of products left with none; and the same for the uncalibrated top-``BASELINE_K`` as a
   reference.
5. **Store** the thresholds in the bundle (``xmctag.bundle_update.update_bundle``: a new bundle built beside the old
   one, swapped in; the bundle id changes): ``calibration.npy``, float32 ``(L,)`` in the label table's order,
   ``np.save`` format, ``+inf`` for a label never kept; and the manifest's ``calibration`` section: ``file``,
   ``target_precision``, ``rule``, ``method``, the settings (``top_k``, ``seed``, ``min_positives``, ``bands``),
   ``dev`` (file name, sha256, rows, rows skipped, unknown labels), ``counts`` (labels by kind of threshold),
   ``band_thresholds`` and ``global_threshold`` (null: +inf, or not fitted) and ``report`` (``fit``, ``held_out``,
   ``baseline``: ``measure``'s figures, as in ``CalibrationReport``).
   Calibrating again replaces the previous calibration.

``Tagger.load(path, calibrated=True)`` (``tag --calibrated``) reads the thresholds and keeps a ranked label only
when its score is at least its label's threshold (``xmctag.scoring.thresholds``), after ``min_score``:
products get fewer than ``top_k`` labels, or none.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from xmctag.errors import UserError
from xmctag.scoring.thresholds import apply_thresholds

CALIBRATION_FILE = "calibration.npy"
DEFAULT_TOP_K = 20
DEFAULT_MIN_POSITIVES = 20
DEFAULT_BANDS = (5, 50, 500)
BASELINE_K = 5  # the reference row of the report: uncalibrated top-5, tag's default
PSEUDO_WRONG = 1  # pseudo-wrong predictions added to every cut (see the module docstring)
RULE = ("tag --calibrated keeps label l of a product when its score >= thresholds[l] (calibration.npy, float32 (L,) "
        "in label-table order, inf = never kept)")
METHOD = ("per group, the lowest score s with correct(>= s) / (predictions(>= s) + 1) >= target_precision on the fit "
          "half of dev; groups: a label with >= min_positives dev positives and predictions, else its train_count "
          "band (<= bands[0], <= bands[1], ..., above) when that has as many, else one global group")


# -- fitting --------------------------------------------------------------------------------------------------------
def group_threshold(scores: np.ndarray, correct: np.ndarray, target: float) -> float:
    """The lowest score ``s`` of ``scores`` with ``correct(>= s) / (predictions(>= s) + PSEUDO_WRONG) >= target``;
    ``inf`` when there is none (or no prediction)."""
    if len(scores) == 0:
        return math.inf
    order = np.argsort(-scores, kind="stable")
    ranked, hits = scores[order], np.cumsum(correct[order])
    last_of_tie = np.r_[ranked[1:] != ranked[:-1], True]  # a cut keeps or drops equal scores together
    precision = hits / (np.arange(1, len(ranked) + 1) + PSEUDO_WRONG)
    ok = np.flatnonzero(last_of_tie & (precision >= target))
    return float(ranked[ok[-1]]) if len(ok) else math.inf


@dataclass
class FittedThresholds:
    thresholds: np.ndarray  # float32 (L,)
    kind: np.ndarray  # (L,) int8: 0 own threshold, 1 its band's, 2 global
    band_thresholds: list[float | None]  # per band: its threshold, None where the band used the global one
    global_threshold: float

    def counts(self) -> dict[str, int]:
        return {"per_label": int((self.kind == 0).sum()), "band": int((self.kind == 1).sum()),
                "global": int((self.kind == 2).sum()), "never": int(np.isposinf(self.thresholds).sum())}


def fit_thresholds(labels: np.ndarray, scores: np.ndarray, correct: np.ndarray, positives: np.ndarray,
                   train_counts: np.ndarray, target: float, min_positives: int = DEFAULT_MIN_POSITIVES,
                   bands: tuple[int, ...] = DEFAULT_BANDS) -> FittedThresholds:
    """Thresholds ``(L,)`` from the fit half's predictions (flat ``labels``, ``scores``, ``correct``) and each
    label's ``positives`` (products whose true labels hold it), as in the module docstring."""
    n_labels = len(positives)
    scores = np.asarray(scores, dtype=np.float32)  # thresholds are scores, compared in tagging's float32
    predicted = np.bincount(labels, minlength=n_labels)
    own = (positives >= min_positives) & (predicted >= min_positives)
    thresholds = np.zeros(n_labels, dtype=np.float64)
    kind = np.full(n_labels, 2, dtype=np.int8)
    by_label = np.argsort(labels, kind="stable")
    starts = np.r_[0, np.cumsum(predicted)]
    for label in np.flatnonzero(own):
        rows = by_label[starts[label]:starts[label + 1]]
        thresholds[label] = group_threshold(scores[rows], correct[rows], target)
        kind[label] = 0
    pooled = ~own[labels]  # the predictions of labels without a threshold of their own
    band = np.searchsorted(np.asarray(bands, dtype=np.int64), np.asarray(train_counts), side="left")
    band_thresholds: list[float | None] = []
    for b in range(len(bands) + 1):
        members = ~own & (band == b)
        in_band = pooled & members[labels]
        if positives[members].sum() >= min_positives and in_band.sum() >= min_positives:
            value = group_threshold(scores[in_band], correct[in_band], target)
            thresholds[members], kind[members] = value, 1
            band_thresholds.append(value)
        else:
            band_thresholds.append(None)
    rest = kind[labels] == 2  # the predictions of the labels left to the global threshold
    pool = rest if rest.sum() >= min_positives else np.ones(len(labels), dtype=bool)
    global_threshold = group_threshold(scores[pool], correct[pool], target)
    thresholds[kind == 2] = global_threshold
    return FittedThresholds(thresholds.astype(np.float32), kind, band_thresholds, global_threshold)


# -- the dev catalog, tagged ----------------------------------------------------------------------------------------
@dataclass
class DevScores:
    """The dev catalog tagged at ``top_k``: per tagged row its ranked labels and scores, which are correct, and how
    many true labels it has."""

    indices: np.ndarray  # (n, k) int64, -1 = no label
    scores: np.ndarray  # (n, k) float32
    correct: np.ndarray  # (n, k) bool
    truth_counts: np.ndarray  # (n,) true labels of each row, those unknown to the bundle included
    truth_rows: np.ndarray  # with truth_labels: (row, label index) of every known true label
    truth_labels: np.ndarray
    n_labels: int
    top_k: int
    rows_read: int = 0
    rows_skipped: int = 0  # no text
    unknown_labels: int = 0  # true labels not in the bundle's label table
    source: str = ""
    sha256: str = ""


def score_dev(tagger, dev: str | Path, top_k: int = DEFAULT_TOP_K, batch_size: int = 1024,
              progress: bool = False) -> DevScores:
    """Tags the dev catalog ``dev`` (see the module docstring) with ``tagger`` (an ``xmctag.Tagger``)."""
    import polars as pl

    from xmctag.io.catalog import SKIP_EMPTY_TEXT
    from xmctag.io.datasets import check_label_list_column, read_table, table_columns
    from xmctag.io.hashing import file_sha256
    from xmctag.progress import Progress

    dev = Path(dev)
    if not dev.is_file():
        raise UserError(f"--dev {dev}: no such file")
    labels_col, catalog = tagger.config.labels_col, tagger.catalog
    present = table_columns(dev)
    columns = [*catalog.text_cols, labels_col] + ([catalog.image_col] if catalog.image_col in present else [])
    frame = read_table(dev, columns)
    check_label_list_column(dev, labels_col, frame.schema[labels_col])
    frame = frame.with_columns(pl.col(labels_col).list.eval(pl.element().cast(pl.String)))  # ids as in the table
    # Rows are matched to their truth by position: the row number stands in for the id, so only text can be missing.
    frame = frame.with_columns(pl.int_range(pl.len()).cast(pl.String).alias(catalog.id_col))
    catalog.check_schema(dev, frame.schema)
    skipped: dict[str, int] = {}
    prepared = catalog.prepare(frame, source=str(dev), skipped=skipped)
    if len(prepared) < 2:
        raise UserError(f"--dev {dev}: {len(prepared)} rows with text; calibration needs at least 2 (one per half)")
    top_k = min(top_k, len(tagger.label_ids))
    images = tagger.images() if tagger.fusion is not None and "image" in prepared.columns else None
    indices, scores = [], []
    with Progress(progress).task("tagging dev", total=len(prepared), unit="products") as update:
        for start in range(0, len(prepared), batch_size):
            batch = prepared.slice(start, batch_size)
            features = images.features(batch["image"].to_list(), dev.parent) if images is not None else None
            top, score = tagger.predict(batch["text"].to_list(), top_k, images=features)
            indices.append(top)
            scores.append(score)
            update(len(batch))
    index_of = {label: i for i, label in enumerate(tagger.label_ids.tolist())}
    truth = frame[labels_col].to_list()
    rows = [int(r) for r in prepared["id"].to_list()]
    truth_rows, truth_labels, truth_counts, unknown = [], [], np.zeros(len(rows), dtype=np.int64), 0
    for i, row in enumerate(rows):
        known = {index_of[x] for x in set(truth[row] or []) if x is not None and x in index_of}
        named = {x for x in (truth[row] or []) if x is not None}
        truth_counts[i] = len(named)
        unknown += len(named) - len(known)
        truth_rows += [i] * len(known)
        truth_labels += sorted(known)
    indices, scores = np.concatenate(indices).astype(np.int64), np.concatenate(scores).astype(np.float32)
    truth_rows, truth_labels = np.asarray(truth_rows, dtype=np.int64), np.asarray(truth_labels, dtype=np.int64)
    n_labels = len(tagger.label_ids)
    true_pairs = set((truth_rows * n_labels + truth_labels).tolist())
    keys = np.arange(len(rows))[:, None] * n_labels + indices
    correct = (indices >= 0) & np.isin(keys, np.fromiter(true_pairs, np.int64, len(true_pairs)))
    return DevScores(indices, scores, correct, truth_counts, truth_rows, truth_labels, n_labels, top_k,
                     rows_read=len(frame), rows_skipped=skipped.get(SKIP_EMPTY_TEXT, 0), unknown_labels=unknown,
                     source=str(dev), sha256=file_sha256(dev))


def split_rows(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(fit rows, held-out rows)``: a seeded permutation of ``range(n)`` cut in two, the fit half the larger by at
    most one, each sorted."""
    order = np.random.default_rng(seed).permutation(n)
    half = (n + 1) // 2
    return np.sort(order[:half]), np.sort(order[half:])


def measure(dev: DevScores, rows: np.ndarray, thresholds: np.ndarray | None = None, k: int | None = None) -> dict:
    """On ``rows`` of ``dev``: ``precision`` (None when no label is kept) and micro ``recall`` of the labels kept,
    ``labels_per_product``, ``no_label_share`` and ``rows``. Kept: the top-``k`` (default all ``top_k``) labels,
    and with ``thresholds`` only those scoring at least their label's threshold."""
    indices, scores, correct = dev.indices[rows, :k], dev.scores[rows, :k], dev.correct[rows, :k]
    kept = (apply_thresholds(indices, scores, thresholds) if thresholds is not None else indices) >= 0
    n_kept, n_correct = int(kept.sum()), int((kept & correct).sum())
    truths = int(dev.truth_counts[rows].sum())
    return {"rows": len(rows), "precision": n_correct / n_kept if n_kept else None,
            "recall": n_correct / truths if truths else None,
            "labels_per_product": n_kept / len(rows) if len(rows) else 0.0,
            "no_label_share": float((kept.sum(axis=1) == 0).mean()) if len(rows) else 0.0}


# -- the report -----------------------------------------------------------------------------------------------------
@dataclass
class CalibrationReport:
    """What a calibration promised and what it measured (``to_dict``: the manifest's ``calibration.report``)."""

    target_precision: float
    top_k: int
    seed: int
    min_positives: int
    bands: list[int]
    dev: str
    dev_rows: int  # rows read
    dev_rows_skipped: int  # no text
    unknown_labels: int  # true labels not in the bundle's label table (recall counts them)
    fit: dict  # ``measure`` on the fit half, thresholds applied
    held_out: dict  # ``measure`` on the held-out half, thresholds applied: what the promise is checked against
    baseline: dict  # ``measure`` on the held-out half, uncalibrated top-BASELINE_K
    counts: dict  # labels by kind of threshold: per_label, band, global, never
    band_thresholds: list[float | None] = field(default_factory=list)
    global_threshold: float | None = None
    bundle: str | None = None  # the calibrated bundle
    bundle_id: str | None = None  # its new id
    previous_bundle_id: str | None = None

    @property
    def measured_precision(self) -> float | None:
        return self.held_out["precision"]

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        """The summary printed under the table."""
        measured = self.measured_precision
        c = self.counts
        return [
            (f"promised precision {self.target_precision:g}, measured "
             + (f"{measured:.4f}" if measured is not None else "n/a (no label kept)")
             + f" on {self.held_out['rows']:,} held-out rows of {self.dev} (fit on the other {self.fit['rows']:,}; "
             f"seed {self.seed}, top-{self.top_k})"),
            (f"thresholds: {c['per_label']:,} labels on their own, {c['band']:,} by frequency band, "
             f"{c['global']:,} global; {c['never']:,} never kept"),
        ] + ([f"bundle {self.bundle}: id {self.previous_bundle_id} -> {self.bundle_id}"] if self.bundle else [])


def report_rows(report: CalibrationReport) -> list[tuple[str, ...]]:
    """The rows of ``calibrate``'s table (``REPORT_COLUMNS``): fit half, held-out half, and the uncalibrated top-k
    on the held-out half."""
    def cells(name: str, m: dict) -> tuple[str, ...]:
        percent = [f"{100 * m[key]:.2f}" if m[key] is not None else "-" for key in ("precision", "recall")]
        return (name, f"{m['rows']:,}", *percent, f"{m['labels_per_product']:.2f}",
                f"{100 * m['no_label_share']:.1f} %")

    return [cells("fit, calibrated", report.fit), cells("held-out, calibrated", report.held_out),
            cells(f"held-out, top-{report.baseline['k']}", report.baseline)]


REPORT_COLUMNS = ("", "rows", "precision", "recall", "labels/product", "none")
REPORT_CAPTION = "none: products left without a label"


def summary_line(summary, tagger, min_score: float | None) -> str:
    """``tag --calibrated``'s line: how many products got fewer than k labels, and none (a ``TagSummary``)."""
    target = tagger.bundle.manifest["calibration"]["target_precision"]
    cut = f"calibrated thresholds (precision {target:g})" + (f" and --min-score {min_score:g}"
                                                             if min_score is not None else "")
    return (f"{cut}: {summary.fewer_than_k:,} of {summary.rows_tagged:,} products got fewer than {summary.top_k} "
            f"labels, {summary.without_labels:,} none (Parquet: an empty list; CSV/JSONL: no rows)")


def _finite(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def fit_calibration(dev: DevScores, train_counts: np.ndarray, precision: float, seed: int = 0,
                    min_positives: int = DEFAULT_MIN_POSITIVES,
                    bands: tuple[int, ...] = DEFAULT_BANDS) -> tuple[np.ndarray, CalibrationReport]:
    """Thresholds fitted on one half of ``dev`` (``split_rows(n, seed)``) and the report measured on the other."""
    check_settings(precision, dev.top_k, min_positives)
    fit_rows, held_out = split_rows(len(dev.indices), seed)
    in_fit = np.zeros(len(dev.indices), dtype=bool)
    in_fit[fit_rows] = True
    kept = dev.indices[fit_rows] >= 0
    positives = np.bincount(dev.truth_labels[in_fit[dev.truth_rows]], minlength=dev.n_labels)
    fitted = fit_thresholds(dev.indices[fit_rows][kept], dev.scores[fit_rows][kept], dev.correct[fit_rows][kept],
                            positives, train_counts, precision, min_positives, bands)
    report = CalibrationReport(
        target_precision=precision, top_k=dev.top_k, seed=seed, min_positives=min_positives, bands=list(bands),
        dev=dev.source, dev_rows=dev.rows_read, dev_rows_skipped=dev.rows_skipped, unknown_labels=dev.unknown_labels,
        fit=measure(dev, fit_rows, fitted.thresholds), held_out=measure(dev, held_out, fitted.thresholds),
        baseline={"k": min(BASELINE_K, dev.top_k), **measure(dev, held_out, k=BASELINE_K)},
        counts=fitted.counts(), band_thresholds=[_finite(t) for t in fitted.band_thresholds],
        global_threshold=_finite(fitted.global_threshold))
    return fitted.thresholds, report


def check_settings(precision: float, top_k: int, min_positives: int) -> None:
    if not 0.0 < precision < 1.0:  # also refuses nan
        raise UserError(f"--precision must be between 0 and 1 (exclusive), not {precision}")
    if top_k < 1:
        raise UserError(f"--top-k must be >= 1, not {top_k}")
    if min_positives < 1:
        raise UserError(f"--min-positives must be >= 1, not {min_positives}")


def manifest_section(report: CalibrationReport, dev: DevScores) -> dict:
    """The manifest's ``calibration`` section (see the module docstring)."""
    return {"file": CALIBRATION_FILE, "target_precision": report.target_precision, "rule": RULE, "method": METHOD,
            "top_k": report.top_k, "seed": report.seed, "min_positives": report.min_positives,
            "bands": report.bands, "dev": {"file": Path(dev.source).name, "sha256": dev.sha256,
                                           "rows": dev.rows_read, "rows_skipped": dev.rows_skipped,
                                           "unknown_labels": dev.unknown_labels},
            "counts": report.counts, "band_thresholds": report.band_thresholds,
            "global_threshold": report.global_threshold,
            "report": {"fit": report.fit, "held_out": report.held_out, "baseline": report.baseline}}


def npy_bytes(thresholds: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(thresholds, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()


# -- the whole command ----------------------------------------------------------------------------------------------
def calibrate(bundle: str | Path, dev: str | Path, precision: float = 0.9, top_k: int = DEFAULT_TOP_K,
              seed: int = 0, min_positives: int = DEFAULT_MIN_POSITIVES, bands: tuple[int, ...] = DEFAULT_BANDS,
              out: str | Path | None = None, device: str = "auto", progress: bool = True) -> CalibrationReport:
    """Fits thresholds for ``precision`` on ``dev`` and stores them in ``bundle`` (in place: the bundle is rebuilt
    beside itself and swapped in, ``xmctag.bundle_update``), or in a calibrated copy at ``out`` (a new or empty
    directory); returns the report. A failure leaves the bundle as it was."""
    from xmctag.bundle_update import update_bundle
    from xmctag.tagger import Tagger

    check_settings(precision, top_k, min_positives)
    if list(bands) != sorted(set(bands)) or any(b < 0 for b in bands):
        raise UserError(f"calibration bands must be increasing training counts >= 0, not {list(bands)}")
    bundle = Path(bundle)
    tagger = Tagger.load(bundle, device=device)
    train_counts = tagger.bundle.labels(["train_count"], optional=())["train_count"].to_numpy()
    scores = score_dev(tagger, dev, top_k, progress=progress)
    thresholds, report = fit_calibration(scores, train_counts, precision, seed, min_positives, bands)

    def check(staged: Path) -> None:  # the new bundle opens and its thresholds load, before it replaces anything
        from xmctag.bundle import Bundle

        if Bundle.open(staged, verify=False).calibration() is None:
            raise UserError(f"{staged}: the calibration was not stored (a bug)")

    manifest = update_bundle(bundle, {"calibration": manifest_section(report, scores)},
                             {CALIBRATION_FILE: npy_bytes(thresholds)}, out=out, check=check,
                             what="calibrate", expected_id=tagger.bundle_id)
    report.bundle, report.bundle_id = str(out or bundle), manifest["bundle_id"]
    report.previous_bundle_id = tagger.bundle_id
    return report
