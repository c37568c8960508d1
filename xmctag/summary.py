"""What a run reports to the job that started it: counts, checks of the result, and ``--summary-json``.

``TagSummary``: the counts of a tagging run (rows read, tagged, skipped by reason, images by outcome). ``RunChecks``
says when a finished run has failed anyway (``ThresholdError``, exit 3, and no output written):

- nothing was tagged (no row read, or every row skipped), unless ``allow_empty``;
- more than ``max_skipped_share`` of the rows read were skipped (no id, no text);
- every image the catalog names failed (bundles with images), or more than ``max_image_failure_share`` of them.

``run_summary(path, command, **fields)`` writes ``--summary-json PATH`` (atomically) when the block ends, however it
ends. The file: ``command`` (tag, train, export), ``status`` (``ok``, ``failed``, ``interrupted``), ``exit_code``
(what the CLI exits with: 0, 2 user error, 3 failed a check, 74 environment, 75 output locked, 130/143 interrupted,
1 bug; see ``xmctag.errors``), ``error`` (one line, on failure), ``started`` / ``finished`` (UTC, ISO 8601),
``seconds``, ``versions`` (xmctag and its libraries), and the command's own fields (``tag``: ``catalog``,
``catalog_sha256``, ``output``, ``format``, ``bundle``, ``bundle_id``, ``rows`` (with ``--previous`` also
``rows.incremental``: ``xmctag.incremental.IncrementalCounts``), ``images``, ``checks``; ``train``:
the run directory, rows, epochs, dev metrics; ``export``: the bundle and its id).
"""

from __future__ import annotations

import datetime
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from xmctag.errors import ThresholdError, UserError, first_line


@dataclass
class TagSummary:
    output: Path | None
    rows_read: int = 0
    rows_tagged: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    images: dict[str, int] | None = None  # fused bundles: ImageCounts (used, missing, broken, cached, ...)
    image_cache: Path | None = None
    without_labels: int = 0  # products tagged whose labels all were cut (min_score, calibrated thresholds)
    top_k: int = 0  # labels per product asked for, capped at the number of labels
    incremental: dict | None = None  # tag --previous: xmctag.incremental.IncrementalCounts.to_dict()
    fewer_than_k: int = 0  # products tagged with fewer than top_k labels (min_score, calibrated thresholds)

    @property
    def products_per_second(self) -> float:
        return self.rows_tagged / self.seconds if self.seconds > 0 else 0.0

    @property
    def rows_skipped(self) -> int:
        return sum(self.skipped.values())

    def add_batch(self, rows_read: int, skipped: dict[str, int], products=None) -> None:
        """Counts one batch of the catalog: ``rows_read`` rows, ``skipped`` of them by reason, and the products
        written for it (a polars frame with a ``labels`` list column, or None), into this run's totals."""
        self.rows_read += rows_read
        for reason, n in skipped.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + n
        if products is not None:
            self.rows_tagged += len(products)
            n_labels = products["labels"].list.len()
            self.without_labels += int((n_labels == 0).sum())
            self.fewer_than_k += int((n_labels < self.top_k).sum())

    def add_images(self, counts: dict) -> None:
        """Adds one batch's image counts (``xmctag.vision.tagging.ImageCounts.to_dict()``): numbers are summed, the
        first example of each kind of failure kept."""
        if self.images is None:
            self.images = {key: ({} if key == "examples" else 0) for key in counts}
        for key, value in counts.items():
            if key == "examples":
                for kind, example in value.items():
                    self.images["examples"].setdefault(kind, example)
            else:
                self.images[key] = self.images.get(key, 0) + value

    def to_dict(self) -> dict:
        """The ``rows`` and ``images`` sections of the tagging summary (``run_summary``)."""
        rows = {"read": self.rows_read, "tagged": self.rows_tagged, "skipped": self.rows_skipped,
                "skipped_by_reason": dict(self.skipped), "without_labels": self.without_labels,
                "fewer_than_k": self.fewer_than_k}
        if self.incremental is not None:
            rows["incremental"] = dict(self.incremental)
        return {"output": str(self.output) if self.output else None, "top_k": self.top_k, "rows": rows,
                "images": self.images, "image_cache": str(self.image_cache) if self.image_cache else None,
                "tagging_seconds": round(self.seconds, 3), "products_per_second": round(self.products_per_second, 1)}


@dataclass(frozen=True)
class RunChecks:
    """When a finished tagging run counts as failed (see the module docstring); the defaults fail only a run that
    tagged nothing or whose every image failed."""

    max_skipped_share: float | None = None
    max_image_failure_share: float | None = None
    allow_empty: bool = False

    def __post_init__(self):
        for name in ("max_skipped_share", "max_image_failure_share"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:  # also refuses nan
                raise UserError(f"--{name.replace('_', '-')} must be between 0 and 1, not {value}")

    def failures(self, summary: TagSummary) -> list[str]:
        """What the run failed, one line each (empty: it passed)."""
        problems = []
        if summary.rows_tagged == 0 and not self.allow_empty:
            problems.append("no product was tagged" + (f" (all {summary.rows_read} rows skipped)"
                                                        if summary.rows_read else " (the catalog has no rows)")
                            + "; --allow-empty accepts that")
        if self.max_skipped_share is not None and summary.rows_read:
            share = summary.rows_skipped / summary.rows_read
            if share > self.max_skipped_share:
                problems.append(f"{summary.rows_skipped} of {summary.rows_read} rows skipped ({share:.1%} > "
                                f"--max-skipped-share {self.max_skipped_share:g})")
        if summary.images:
            failed = summary.images["missing"] + summary.images["failed"] + summary.images["broken"]
            seen = failed + summary.images["used"]
            limit = self.max_image_failure_share
            if seen and (failed / seen > limit if limit is not None else failed == seen):
                problems.append(f"{failed} of {seen} images failed ({failed / seen:.1%} > "
                                f"--max-image-failure-share {limit:g})" if limit is not None else
                                f"every one of the {seen} images failed; --max-image-failure-share 1 accepts that")
        return problems

    def check(self, summary: TagSummary) -> None:
        problems = self.failures(summary)
        if problems:
            raise ThresholdError("; ".join(problems) + "; no output written")

    def to_dict(self) -> dict:
        return asdict(self)


def library_versions() -> dict[str, str]:
    """Versions of xmctag and the libraries that do its work (bundle manifests, summaries)."""
    import importlib.metadata

    import xmctag

    found = {"xmctag": xmctag.__version__}
    for dist in ("torch", "transformers", "optimum-onnx", "onnx", "onnxruntime", "onnxruntime-gpu", "faiss-cpu",
                 "faiss-gpu", "tokenizers", "polars", "pyarrow"):
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def exit_code_of(error: BaseException) -> int:
    from xmctag.errors import Terminated

    if isinstance(error, UserError):
        return error.exit_code
    if isinstance(error, Terminated):
        return 143
    if isinstance(error, KeyboardInterrupt):
        return 130
    return 1


@contextmanager
def run_summary(path: str | Path | None, command: str, **fields):
    """Yields the summary dict (add fields to it); writes it to ``path`` (None: nowhere) when the block ends."""
    if path is not None:  # checked before the run: a summary that cannot be written must not cost a night's work
        parent = Path(path).expanduser().absolute().parent
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise UserError(f"--summary-json {path}: directory {parent} does not exist or is not writable")
    report = {"command": command, "status": "running", "exit_code": None, "started": now(), **fields}
    started = time.perf_counter()
    try:
        yield report
    except BaseException as e:
        code = exit_code_of(e)
        report.update(status="interrupted" if code in (130, 143) else "failed", exit_code=code, error=first_line(e))
        _write(path, report, started)
        raise
    report.update(status="ok", exit_code=0)
    _write(path, report, started)


def _write(path, report: dict, started: float) -> None:
    if path is None:
        return
    from xmctag.io.atomic import write_json

    report.update(finished=now(), seconds=round(time.perf_counter() - started, 3), versions=library_versions())
    write_json(path, report)
