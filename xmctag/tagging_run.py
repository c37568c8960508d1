"""One tagging run's frame, shared by the engines that tag a catalog into a prediction file: ``Tagger.tag_file``
(the local engine, ``xmctag.tagger``) and the Ray engine (``xmctag.engines.ray_engine``).

``tagging_run`` does everything around the tagging itself, the same way for both:

- before any work: the options (``check_options``), the output format (``xmctag.io.writers.resolve_format``), the
  catalog files (``CatalogColumns.check_file``, each of them), an output that would overwrite one of them, the
  previous night's file (``--previous``);
- the summary (``xmctag.summary.run_summary``: ``--summary-json`` however the run ends) and the counts
  (``TagSummary``: the engine adds each batch's with ``TagSummary.add_batch``);
- the output's provenance metadata (``output_metadata``) and the atomic writer (``PredictionWriter``: one run per
  output, a temporary file renamed into place only when complete);
- the checks of the result (``RunChecks``), before the output is renamed into place: a failed run leaves no output.

    with tagging_run(tagger, catalog, [catalog], output, top_k=5, ...) as run:
        ...  # run.writer.write_frame(products); run.summary.add_batch(...)
    summary = run.summary
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xmctag import __version__
from xmctag.errors import UserError
from xmctag.io.atomic import resolve_output
from xmctag.io.catalog import default_output_path
from xmctag.io.hashing import files_sha256
from xmctag.io.writers import PredictionWriter, resolve_format
from xmctag.summary import RunChecks, TagSummary, now, run_summary


@dataclass
class TaggingRun:
    """What the engine tags into: ``writer`` (rows of ``PRODUCT_SCHEMA``), ``summary`` (its counts), the catalog
    ``columns`` to read, ``top_k`` (capped at the number of labels), ``metadata`` (the output's provenance),
    ``report`` (the ``--summary-json`` fields: an engine may add its own) and ``previous`` (``--previous``: an
    ``xmctag.incremental.Previous``, else None)."""

    writer: PredictionWriter
    summary: TagSummary
    columns: list[str]
    top_k: int
    metadata: dict
    report: dict
    previous: Any = None


@contextmanager
def tagging_run(tagger, catalog: Path, files: list[Path], output: str | Path | None, *, top_k: int,
                fmt: str | None, min_score: float | None, checks: RunChecks | None,
                summary_json: str | Path | None, escape_formulas: bool = False, evidence: int = 0,
                previous: str | Path | None = None, report_fields: dict | None = None):
    """Yields a ``TaggingRun`` for ``tagger`` (a loaded ``xmctag.Tagger``) tagging ``files`` (the Parquet files of
    ``catalog``: the file itself, or the files of a directory or glob) into ``output`` (default: beside
    ``catalog``, ``xmctag.io.catalog.default_output_path``). When the block ends without an error the result is
    checked (``checks``) and the output renamed into place; otherwise nothing is left at ``output``."""
    checks = checks or RunChecks()
    with run_summary(summary_json, "tag", catalog=str(catalog), bundle=str(tagger.path.resolve()),
                     bundle_id=tagger.bundle_id, checks=checks.to_dict(), **(report_fields or {})) as report:
        check_options(top_k, min_score)
        check_evidence(evidence)
        if evidence:
            tagger.evidence_ids()  # before any work: a bundle without training ids cannot give evidence
        top_k = min(top_k, len(tagger.label_ids))
        fmt = resolve_format(Path(output) if output is not None else None, fmt)
        columns = catalog_columns(tagger.catalog, files)
        if tagger.fusion is not None and tagger.fusion["image_col"] not in columns:  # fine, but not what it was for
            warnings.warn(f"{catalog} has no image column {tagger.fusion['image_col']!r}: products are tagged "
                          "from text only", stacklevel=3)
        output = Path(output) if output is not None else default_output_path(catalog, fmt)
        if resolve_output(output).resolve() in {f.resolve() for f in files}:
            raise UserError(f"--output {output}: would overwrite the catalog being tagged")
        summary = TagSummary(output=output, top_k=top_k)
        report.update(output=str(output), format=fmt, catalog_sha256=files_sha256(files))
        metadata = output_metadata(tagger, catalog, report["catalog_sha256"], top_k, min_score, evidence,
                                   escape_formulas and fmt == "csv")
        earlier = None
        if previous is not None:
            from xmctag.incremental import Previous

            earlier = Previous.open(previous, metadata, tagger.label_ids)
        # Opened (its lock taken, its temporary file created) before any work: an output that cannot be written,
        # or that another run is writing, fails now, not after the whole catalog has been tagged.
        with PredictionWriter(output, fmt, metadata, escape_formulas=escape_formulas,
                              evidence=evidence > 0) as writer:
            run = TaggingRun(writer, summary, columns, top_k, metadata, report, earlier)
            try:
                yield run
            finally:
                if earlier is not None:
                    summary.incremental = earlier.finish().to_dict()
                report.update(summary.to_dict())
            checks.check(summary)  # before the output is renamed into place: a failed run leaves none


def catalog_columns(columns, files: list[Path]) -> list[str]:
    """The columns to read from every one of ``files`` (``CatalogColumns.check_file`` of each); the image column
    only when every file has it, and then it must be in all of them."""
    found = [columns.check_file(f) for f in files]
    for f, other in zip(files[1:], found[1:]):
        if other != found[0]:
            image = columns.image_col
            raise UserError(f"{f}: the catalog's files differ in their image column {image!r} ({files[0]} "
                            f"{'has' if image in found[0] else 'lacks'} it, {f} {'has' if image in other else 'lacks'}"
                            " it): give them all the column, or none")
    return found[0]


def output_metadata(tagger, catalog: Path, catalog_sha256: str, top_k: int, min_score: float | None,
                    evidence: int, escape_formulas: bool) -> dict:
    """The provenance recorded with the predictions (Parquet metadata ``xmctag.*``, or ``<output>.meta.json``):
    the bundle, the catalog and its sha256, the time, and the settings ``tag --previous`` compares."""
    return {"bundle_id": tagger.bundle_id, "bundle": str(tagger.path.resolve()), "catalog": str(catalog),
            "catalog_sha256": catalog_sha256, "top_k": top_k, "min_score": min_score,
            "text_cols": ",".join(tagger.config.text_cols), "xmctag_version": __version__, "tagged_at": now(),
            **tagger.output_settings(evidence, escape_formulas)}


def check_evidence(evidence: int) -> None:
    if evidence < 0:
        raise UserError(f"--evidence must be >= 0 (0 = off), not {evidence}")


def check_options(top_k: int, min_score: float | None) -> None:
    if top_k < 1:
        raise UserError(f"--top-k must be >= 1, not {top_k}")
    if min_score is not None and not 0.0 <= min_score <= 1.0:  # also refuses nan, which would cut every label
        raise UserError(f"--min-score must be between 0 and 1 (scores are in [0, 1]), not {min_score}")
