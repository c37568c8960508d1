"""xmctag: batch tagging of product catalogs with extreme multi-label classification (ViXML dual encoders).

Python API (the CLI is a thin layer over it):

    import xmctag
    result = xmctag.train("train.parquet", "labels.parquet", "runs/demo", dev="dev.parquet")
    bundle = xmctag.export("runs/demo", "export/demo")
    tagger = xmctag.Tagger.load("export/demo")
    predictions = tagger.tag(frame)           # polars DataFrame in, DataFrame out
    summary = tagger.tag_file("catalog.parquet", "preds.parquet", top_k=5)
    metrics = xmctag.evaluate("preds.parquet", "truth.parquet").metrics  # evaluate returns an EvalReport
    changes = xmctag.diff("last-night.parquet", "tonight.parquet")       # a DiffReport: .to_dict() is the JSON
    report = xmctag.calibrate("export/demo", "dev.parquet", precision=0.9)  # then Tagger.load(..., calibrated=True)
    report = xmctag.relabel("export/demo", "labels-new.parquet", "export/demo-new")  # a RelabelReport
"""

from xmctag.config import Config
from xmctag.errors import UserError

__version__ = "0.1.0"

__all__ = ["Config", "UserError", "train", "export", "Tagger", "evaluate", "diff", "calibrate", "relabel",
           "__version__"]


def __getattr__(name):
    # Heavy modules (torch, onnxruntime, faiss) load only when their entry point is used.
    if name == "train":
        from xmctag.training.trainer import train

        return train
    if name == "export":
        from xmctag.exporter import export

        return export
    if name == "Tagger":
        from xmctag.tagger import Tagger

        return Tagger
    if name == "evaluate":
        from xmctag.evaluation.predictions import evaluate_predictions

        return evaluate_predictions
    if name == "diff":
        from xmctag.reports.diff import diff_predictions

        return diff_predictions
    if name == "calibrate":
        from xmctag.calibration import calibrate

        return calibrate
    if name == "relabel":
        from xmctag.relabeller import relabel

        return relabel
    raise AttributeError(f"module 'xmctag' has no attribute {name!r}")
