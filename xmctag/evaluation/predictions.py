"""``xmctag eval``: score a prediction file against a truth catalog.

Predictions: any file ``xmctag tag`` writes (Parquet ``id, labels, scores``; CSV/JSONL one row per rank).
Truth: a Parquet catalog with ``id`` and ``labels``. Every truth row counts; a truth row without predictions
scores zero. Propensities for PSP@k come from ``train`` (label counts of a training catalog) when given, else
from the bundle that made the predictions (its label table keeps training counts), else from the truth itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from xmctag.data import read_table
from xmctag.errors import UserError
from xmctag.evaluation.metrics import evaluate_rankings, inverse_propensity


@dataclass
class EvalReport:
    metrics: dict[str, float]  # "P@1" ... in [0, 1]
    rows: int  # truth rows evaluated
    rows_without_predictions: int
    predictions_not_in_truth: int
    propensity_source: str

    def to_dict(self) -> dict:
        return {"metrics": self.metrics, "rows": self.rows, "rows_without_predictions": self.rows_without_predictions,
                "predictions_not_in_truth": self.predictions_not_in_truth,
                "propensity_source": self.propensity_source}


def read_predictions(path: str | Path) -> pl.DataFrame:
    """``id``, ``labels`` (best first) from any prediction format."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".csv", ".jsonl", ".ndjson", ".json"):
        try:
            long = pl.read_csv(path, schema_overrides={"id": pl.String, "label": pl.String}) if suffix == ".csv" \
                else pl.read_ndjson(path, schema_overrides={"id": pl.String, "label": pl.String})
        except (pl.exceptions.PolarsError, OSError) as e:
            raise UserError(f"{path}: cannot read predictions ({str(e).splitlines()[0]})") from None
        missing = {"id", "rank", "label"} - set(long.columns)
        if missing:
            raise UserError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
        return long.sort("id", "rank").group_by("id", maintain_order=True).agg(pl.col("label").alias("labels"))
    frame = read_table(path, ["id", "labels"])
    return frame.with_columns(pl.col("id").cast(pl.String), pl.col("labels").list.eval(pl.element().cast(pl.String)))


def evaluate_predictions(predictions: str | Path, truth: str | Path, train: str | Path | None = None,
                         ks: tuple[int, ...] = (1, 3, 5), psp_a: float = 0.55, psp_b: float = 1.5,
                         id_col: str = "id", labels_col: str = "labels") -> EvalReport:
    preds = read_predictions(predictions)
    truth_frame = read_table(truth, [id_col, labels_col]).select(
        pl.col(id_col).cast(pl.String).alias("id"),
        pl.col(labels_col).list.eval(pl.element().cast(pl.String)).alias("truth"))
    if truth_frame["id"].is_duplicated().any():
        raise UserError(f"{truth}: duplicate ids in column {id_col}")
    joined = truth_frame.join(preds, on="id", how="left")
    not_in_truth = preds.join(truth_frame, on="id", how="anti").height

    counts, n_train, source = _label_counts(train, predictions, truth_frame, labels_col)
    vocabulary: dict[str, int] = {label: i for i, label in enumerate(counts)}

    def index_of(label: str) -> int:
        if label not in vocabulary:
            vocabulary[label] = len(vocabulary)
        return vocabulary[label]

    k_max = max(ks)
    predicted = np.full((len(joined), k_max), -1, dtype=np.int64)
    truth_sets = []
    for row, (true_labels, labels) in enumerate(zip(joined["truth"].to_list(), joined["labels"].to_list())):
        truth_sets.append(np.array(sorted({index_of(x) for x in (true_labels or [])}), dtype=np.int64))
        for rank, label in enumerate((labels or [])[:k_max]):
            predicted[row, rank] = index_of(label)
    label_counts = np.zeros(len(vocabulary))
    label_counts[: len(counts)] = list(counts.values())
    inv_p = inverse_propensity(label_counts, n_train, psp_a, psp_b)
    metrics = evaluate_rankings(predicted, truth_sets, ks, inv_p)
    return EvalReport(metrics, len(joined), int(joined["labels"].is_null().sum()), not_in_truth, source)


def _label_counts(train, predictions, truth_frame: pl.DataFrame, labels_col: str) -> tuple[dict[str, int], int, str]:
    if train is not None:
        frame = read_table(train, [labels_col])
        return _count(frame[labels_col]), len(frame), f"training catalog {train}"
    bundle = _bundle_of(predictions)
    if bundle is not None:
        from xmctag import run_dir

        frame = pl.read_parquet(bundle / run_dir.LABELS, columns=["label", "train_count"])
        n_train = _n_train_of(bundle)
        if n_train:
            return dict(zip(frame["label"], frame["train_count"])), n_train, f"training counts of bundle {bundle}"
    return _count(truth_frame["truth"]), len(truth_frame), "the truth file (pass --train for training counts)"


def _count(labels: pl.Series) -> dict[str, int]:
    counted = labels.cast(pl.List(pl.String)).explode().drop_nulls().value_counts()
    return dict(zip(counted[counted.columns[0]].to_list(), counted["count"].to_list()))


def _bundle_of(predictions) -> Path | None:
    if Path(predictions).suffix.lower() != ".parquet":
        return None
    from xmctag.io.writers import read_parquet_metadata

    try:
        bundle = Path(read_parquet_metadata(predictions).get("bundle", ""))
    except Exception:  # noqa: BLE001 - metadata is a convenience; without it we fall back to the truth counts
        return None
    return bundle if bundle.name and (bundle / "labels.parquet").exists() else None


def _n_train_of(bundle: Path) -> int:
    import json

    from xmctag import bundle as layout

    try:
        return int(json.loads((bundle / layout.MANIFEST).read_text())["training"]["rows"])
    except (KeyError, ValueError, OSError):
        return 0
