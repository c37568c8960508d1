"""``xmctag eval``: score a prediction file against a truth catalog.

Predictions: any file ``xmctag tag`` writes (Parquet ``id, labels, scores``; CSV/JSONL one row per rank).
Truth: a catalog with ``id`` and ``labels`` (a list of label ids: Parquet). Every truth row counts; a truth row
without predictions scores zero, and so does one without labels (both counted in the report's notes). A prediction
file has one prediction list per product: a repeated id (Parquet) or (id, rank) (CSV/JSONL) is an error, and so is
a file none of whose ids is in the truth. A file with no predictions at all (``tag`` on a catalog with nothing to
tag) is scored as such. Propensities for PSP@k come from ``train`` (label counts of a training catalog)
when given, else from the bundle that made the predictions (its label table keeps training counts), found the same
way for every format: the bundle directory the file records (Parquet metadata, the ``bundle`` column of CSV/JSONL),
used only when that directory still holds the bundle id the file records and passes ``Bundle.open``'s checks
(without hashing every file; the label table it reads is verified); else from the truth itself, with a warning
when the file names a bundle that could not be used. The report says which (``propensity_source``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from xmctag.errors import UserError
from xmctag.evaluation.metrics import evaluate_rankings, inverse_propensity
from xmctag.io.datasets import check_label_list_column, check_text_column, read_table
from xmctag.io.predictions import PredictionSource, read_prediction_file


@dataclass
class EvalReport:
    metrics: dict[str, float]  # "P@1" ... in [0, 1]
    rows: int  # truth rows evaluated
    rows_without_predictions: int
    predictions_not_in_truth: int
    propensity_source: str
    truth_rows_without_labels: int = 0
    notes: list[str] = field(default_factory=list)  # what the reader should know about these numbers, one line each

    def to_dict(self) -> dict:
        return {"metrics": self.metrics, "rows": self.rows, "rows_without_predictions": self.rows_without_predictions,
                "predictions_not_in_truth": self.predictions_not_in_truth,
                "truth_rows_without_labels": self.truth_rows_without_labels,
                "propensity_source": self.propensity_source, "notes": self.notes}


def evaluate_predictions(predictions: str | Path, truth: str | Path, train: str | Path | None = None,
                         ks: tuple[int, ...] = (1, 3, 5), psp_a: float = 0.55, psp_b: float = 1.5,
                         id_col: str = "id", labels_col: str = "labels") -> EvalReport:
    if not ks or min(ks) < 1:
        raise UserError("--k needs cut-offs >= 1")
    preds, made_by = read_prediction_file(predictions)
    truth_frame = read_table(truth, [id_col, labels_col])
    check_text_column(truth, id_col, truth_frame.schema[id_col], "a product id")
    check_label_list_column(truth, labels_col, truth_frame.schema[labels_col])
    truth_frame = truth_frame.select(
        pl.col(id_col).cast(pl.String).alias("id"),
        pl.col(labels_col).list.eval(pl.element().cast(pl.String)).alias("truth"))
    if truth_frame["id"].is_duplicated().any():
        raise UserError(f"{truth}: duplicate ids in column {id_col}")
    joined = truth_frame.join(preds, on="id", how="left")
    not_in_truth = preds.join(truth_frame, on="id", how="anti").height
    if preds.height and not_in_truth == preds.height:
        raise UserError(f"{predictions}: no predicted id is in the truth file {truth} (column {id_col}): wrong file?")

    counts, n_train, source = _label_counts(train, predictions, made_by, truth_frame, labels_col)
    vocabulary: dict[str, int] = {label: i for i, label in enumerate(counts)}

    def index_of(label: str) -> int:
        if label not in vocabulary:
            vocabulary[label] = len(vocabulary)
        return vocabulary[label]

    k_max = max(ks)
    depth = int(preds["labels"].list.len().max() or 0)  # the most labels any product got
    # Columns past the depth would all be -1 (the metrics divide by k all the same): memory stays rows x depth.
    predicted = np.full((len(joined), max(1, min(k_max, depth))), -1, dtype=np.int64)
    truth_sets = []
    for row, (true_labels, labels) in enumerate(zip(joined["truth"].to_list(), joined["labels"].to_list())):
        truth_sets.append(np.array(sorted({index_of(x) for x in (true_labels or [])}), dtype=np.int64))
        for rank, label in enumerate((labels or [])[:k_max]):
            predicted[row, rank] = index_of(label)
    label_counts = np.zeros(len(vocabulary))
    label_counts[: len(counts)] = list(counts.values())
    inv_p = inverse_propensity(label_counts, n_train, psp_a, psp_b)
    metrics = evaluate_rankings(predicted, truth_sets, ks, inv_p)
    without_predictions = int(joined["labels"].is_null().sum())
    without_labels = sum(len(t) == 0 for t in truth_sets)
    notes = []
    if without_predictions:
        notes.append(f"{without_predictions} truth rows had no predictions (scored 0)")
    if not_in_truth:
        notes.append(f"{not_in_truth} predicted ids are not in the truth file (ignored)")
    if without_labels:
        notes.append(f"{without_labels} truth rows have no labels (scored 0)")
    if 0 < depth < k_max:
        notes.append(f"k={k_max} exceeds the {depth} label{'s' if depth > 1 else ''} predicted per product; "
                     f"P@{k_max} counts the missing ones as wrong")
    return EvalReport(metrics, len(joined), without_predictions, not_in_truth, source, without_labels, notes)


TRUTH_COUNTS = "the truth file (pass --train for training counts)"


def _label_counts(train, predictions, made_by: PredictionSource, truth_frame: pl.DataFrame,
                  labels_col: str) -> tuple[dict[str, int], int, str]:
    """Label counts and row count for the propensities, and where they came from: ``train``; else the bundle that
    made the predictions, the same lookup for every format (its directory as recorded, and only if its bundle id is
    the one recorded); else the truth file."""
    if train is not None:
        frame = read_table(train, [labels_col])
        check_label_list_column(train, labels_col, frame.schema[labels_col])
        return _count(frame[labels_col]), len(frame), f"training catalog {train}"
    found = _bundle_counts(made_by)
    if isinstance(found, tuple):
        return found
    if found is not None:  # the file names a bundle that cannot be used: say so rather than quietly switch
        warnings.warn(f"{predictions}: {found}; PSP propensities come from the truth file's label counts instead "
                      "(pass --train for training counts)", stacklevel=3)
    return _count(truth_frame["truth"]), len(truth_frame), TRUTH_COUNTS


def _bundle_counts(made_by: PredictionSource) -> tuple[dict[str, int], int, str] | str | None:
    """The training counts of the bundle that made the predictions, or why they cannot be had (a string), or None
    when the file names no bundle at all. The bundle is read through ``Bundle`` (its manifest checked, without
    hashing every file: only the label table read here is verified)."""
    from xmctag import run_dir
    from xmctag.bundle import Bundle

    if made_by.note:
        return made_by.note
    if made_by.bundle is None:
        return None if made_by.bundle_id is None else \
            f"it names bundle {made_by.bundle_id} but not where it is (written by an older xmctag?)"
    path = Path(made_by.bundle)
    try:
        bundle = Bundle.open(path, verify=False)
    except UserError as e:
        return f"no readable bundle at {path}, which made it ({e})"
    if made_by.bundle_id is None or bundle.bundle_id != made_by.bundle_id:
        return (f"the bundle at {path} is now bundle {bundle.bundle_id}, not {made_by.bundle_id} that made the "
                "predictions (re-exported?)")
    n_train = bundle.manifest.get("training", {}).get("rows", 0)
    if not n_train:
        return f"bundle {path} has no training counts"
    try:
        bundle.check_file(run_dir.LABELS)
        frame = bundle.labels(["label", "train_count"])
    except UserError as e:
        return f"bundle {path} has no usable training counts ({e})"
    return dict(zip(frame["label"], frame["train_count"])), n_train, f"training counts of bundle {path}"


def _count(labels: pl.Series) -> dict[str, int]:
    counted = labels.cast(pl.List(pl.String)).explode().drop_nulls().value_counts()
    return dict(zip(counted[counted.columns[0]].to_list(), counted["count"].to_list()))
