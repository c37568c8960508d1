"""xmctag: batch tagging of product catalogs with extreme multi-label classification (ViXML dual encoders).

Python API (the CLI is a thin layer over it):

    import xmctag
    result = xmctag.train("train.parquet", "labels.parquet", "runs/demo", dev="dev.parquet")
    bundle = xmctag.export("runs/demo", "export/demo")
    tagger = xmctag.Tagger.load("export/demo")
    predictions = tagger.tag(frame)           # polars DataFrame in, DataFrame out
    summary = tagger.tag_file("catalog.parquet", "preds.parquet", top_k=5)
    summary = xmctag.RayTagger.load("export/demo", actors=2).tag_file("catalog/", "preds.parquet")  # Ray Data
    metrics = xmctag.evaluate("preds.parquet", "truth.parquet").metrics  # evaluate returns an EvalReport
    changes = xmctag.diff("last-night.parquet", "tonight.parquet")       # a DiffReport: .to_dict() is the JSON
    report = xmctag.calibrate("export/demo", "dev.parquet", precision=0.9)  # then Tagger.load(..., calibrated=True)
    report = xmctag.relabel("export/demo", "labels-new.parquet", "export/demo-new")  # a RelabelReport
"""

from xmctag.config import Config
from xmctag.errors import UserError

__version__ = "0.1.0"

# The API's entry points -> (module, name). Heavy modules (torch, onnxruntime, faiss) load only when their entry
# point is used.
ENTRY_POINTS = {
    "train": ("xmctag.training.trainer", "train"),
    "export": ("xmctag.exporter", "export"),
    "Tagger": ("xmctag.tagger", "Tagger"),
    "RayTagger": ("xmctag.engines.ray_engine", "RayTagger"),
    "evaluate": ("xmctag.evaluation.predictions", "evaluate_predictions"),
    "diff": ("xmctag.reports.diff", "diff_predictions"),
    "calibrate": ("xmctag.calibration", "calibrate"),
    "relabel": ("xmctag.relabeller", "relabel"),
}

__all__ = ["Config", "UserError", *ENTRY_POINTS, "__version__"]


def __getattr__(name):
    if name not in ENTRY_POINTS:
        raise AttributeError(f"module 'xmctag' has no attribute {name!r}")
    import importlib

    module, attribute = ENTRY_POINTS[name]
    return getattr(importlib.import_module(module), attribute)
