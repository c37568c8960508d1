"""The ``xmctag`` command line: a thin Typer layer over the Python API (shared pieces in ``xmctag.cli_util``).

Every command turns a ``UserError`` into one red line on stderr and exit code 2; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from xmctag.cli_util import (
    DeviceOption,
    ImageColOption,
    ImageHostsOption,
    QuietOption,
    SummaryJsonOption,
    WorkersOption,
    err_console,
    image_hosts,
    label_columns,
    newest_bundle,
    out_console,
    parse_epochs,
    print_examples,
    print_metrics,
    show_warning,
    split_list,
    terminate_on_sigterm,
    user_errors,
)
from xmctag.errors import UserError
from xmctag.vision.registry import DEFAULT_VISION_ENCODER

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,  # help "[default: x]" as written
                  help="Tag product catalogs with extreme multi-label classification (ViXML dual encoders).")

DEFAULT_EXPORT_DIR = Path("export")


@app.command()
@user_errors
def train(
    train: Path = typer.Option(..., "--train", help="Training catalog (Parquet: id, text columns, labels)."),
    labels: Path = typer.Option(..., "--labels", help="Label table (Parquet or CSV: label, text[, synonyms])."),
    out: Path = typer.Option(..., "--out", help="Run directory to write, e.g. runs/NAME."),
    dev: Optional[Path] = typer.Option(None, "--dev", help="Dev catalog, evaluated after each epoch."),
    encoder: Optional[str] = typer.Option(None, "--encoder", help="builtin:minilm-l6, a HF id or a local dir."),
    epochs: Optional[str] = typer.Option(None, "--epochs", help="Fine-tuning epochs, or auto (default: as many "
                                         "as fit --time-budget, measured on this machine)."),
    time_budget: Optional[float] = typer.Option(None, "--time-budget", help="Minutes of fine-tuning that "
                                                "--epochs / --classifier-epochs auto may use (default 20; 0 = no "
                                                "limit)."),
    classifier_epochs: Optional[str] = typer.Option(None, "--classifier-epochs", help="Epochs of the classifier "
                                                    "stage (encoder fine-tuned through the label vectors), auto or "
                                                    "0 = off [default: auto, the budget left]."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="Product-side tokens."),
    lr: Optional[float] = typer.Option(None, "--lr"),
    config_file: Optional[Path] = typer.Option(None, "--config", help="TOML file with Config settings."),
    id_col: Optional[str] = typer.Option(None, "--id-col"),
    text_cols: Optional[str] = typer.Option(None, "--text-cols", help="Comma-separated, e.g. title,description."),
    labels_col: Optional[str] = typer.Option(None, "--labels-col"),
    label_cols: Optional[str] = typer.Option(None, "--label-cols", help="Label table columns ID,TEXT[,SYNONYMS...] "
                                             "[default: label,text + alt_texts, synonyms when present]."),
    vision: Optional[str] = typer.Option(None, "--vision", help=f"Image fusion: auto ({DEFAULT_VISION_ENCODER} "
                                         "when the catalog has the image column), none (text only) or a vision "
                                         "model; +colour appends a colour histogram [default: auto]."),
    image_col: Optional[str] = ImageColOption,
    cache_dir: Optional[str] = typer.Option(None, "--cache-dir", help="Image-embedding cache, shareable between "
                                            "runs [default: <out>/image_cache]."),
    hosts: Optional[str] = ImageHostsOption,
    lexical: Optional[str] = typer.Option(None, "--lexical", help="Lexical model fused with the dense ranking: "
                                          "omikuji (TF-IDF label trees) or none (dense only) [default: omikuji]."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --out from its last "
                                "checkpoint (either stage's); a finished run is refused: use --overwrite to train "
                                "it again."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run in --out (only an xmctag run "
                                   "directory, and not one holding an input)."),
    device: str = DeviceOption,
    summary_json: Optional[Path] = SummaryJsonOption,
    quiet: bool = QuietOption,
):
    """Train a dual encoder and label vectors; writes a self-contained run directory."""
    from xmctag.config import Config
    from xmctag.run_dir import CONFIG
    from xmctag.training.trainer import train as train_api

    allowed = image_hosts(hosts)
    overrides = dict(encoder=encoder, epochs=parse_epochs(epochs, "--epochs"),
                     classifier_epochs=parse_epochs(classifier_epochs, "--classifier-epochs"),
                     time_budget_minutes=time_budget, batch_size=batch_size, max_length=max_length, lr=lr,
                     id_col=id_col, text_cols=split_list(text_cols), labels_col=labels_col,
                     **label_columns(label_cols), seed=seed, vision=vision, image_col=image_col, lexical=lexical,
                     image_cache_dir=str(Path(cache_dir).resolve()) if cache_dir else None)
    # A resumed run keeps its saved settings; what --config and the flags set now must agree (the API checks).
    saved = Config.load(out / CONFIG).to_dict() if resume and (out / CONFIG).exists() else None
    config = Config.create(config_file, base=saved, **overrides)
    result = train_api(train, labels, out, dev=dev, config=config, resume=resume, overwrite=overwrite,
                       device=device, progress=not quiet, summary_json=summary_json, image_hosts=allowed)
    if result.dev_metrics:
        print_metrics(result.dev_metrics, title=f"dev ({dev})")
    err_console.print(f"model written to {result.run_dir}")


@app.command()
@user_errors
def export(
    run: Path = typer.Argument(..., help="Run directory written by `xmctag train`."),
    out: Optional[Path] = typer.Option(None, "--out", help="Bundle directory [default: export/<run name>]."),
    fp16: bool = typer.Option(True, "--fp16/--no-fp16", help="Also write the fp16 graph for GPUs."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the bundle in --out (only an xmctag "
                                   "bundle, and not one holding the run)."),
    index: str = typer.Option("auto", "--index", help="Label and neighbour search: auto (exact below "
                              "--exact-below rows, else ivf), exact, or ivf (approximate, nprobe tuned to "
                              "--recall-floor)."),
    exact_below: Optional[int] = typer.Option(None, "--exact-below", help="--index auto: exact search for fewer "
                                              "rows [default: 50000 labels, 20000 training products]."),
    recall_floor: float = typer.Option(0.98, "--recall-floor", help="Recall against exact search an approximate "
                                       "index must reach on real rows, else exact search (lower it explicitly)."),
    summary_json: Optional[Path] = SummaryJsonOption,
    quiet: bool = QuietOption,
):
    """Export a trained run to ONNX (fp32 for CPU, fp16 for GPU) with its label and neighbour searches."""
    from xmctag.exporter import export as export_api

    export_api(run, out or DEFAULT_EXPORT_DIR / run.resolve().name, fp16=fp16, overwrite=overwrite,
               progress=not quiet, summary_json=summary_json, index=index, exact_below=exact_below,
               recall_floor=recall_floor)


@app.command()
@user_errors
def tag(
    catalog: Path = typer.Argument(..., help="Catalog to tag (Parquet with id and the model's text columns)."),
    model: Optional[Path] = typer.Option(None, "--model", help="Bundle directory [default: newest in ./export]."),
    top_k: int = typer.Option(5, "--top-k", min=1, help="Labels per product (at most the number of labels)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o",
                                          help="[default: <catalog>.predictions.<format> beside the catalog]"),
    fmt: Optional[str] = typer.Option(None, "--format", help="parquet, csv or jsonl [default: from the --output "
                                      "extension (.parquet, .csv, .jsonl/.ndjson/.json), else parquet]; must agree "
                                      "with a known extension."),
    min_score: Optional[float] = typer.Option(None, "--min-score", help="Drop labels scoring below this (0-1). A "
                                              "product left without labels keeps an empty list in Parquet and has "
                                              "no rows in CSV/JSONL."),
    batch_size: int = typer.Option(4096, "--batch-size", min=1, help="Rows read per batch."),
    strict: bool = typer.Option(False, "--strict", help="Fail on a row without an id or text instead of "
                                "skipping it."),
    device: str = DeviceOption,
    precision: str = typer.Option("auto", "--precision", help="Graph: auto (fp16 on CUDA, fp32 on CPU), fp32, "
                                  "fp16 or int8 (CPU, ~2x the fp32 graph, approximate)."),
    show: int = typer.Option(0, "--show", min=0, help="Print the top labels of the first N products."),
    exclusive_groups: bool = typer.Option(False, "--exclusive-groups/--no-exclusive-groups",
                                          help="At most one label per product of each facet that training found "
                                          "exclusive (e.g. one colour) [default: all labels ranked freely]."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Image bundles: image-embedding cache "
                                             "[default: the bundle's, else xmctag-image-cache beside the output]."),
    workers: int = WorkersOption,
    summary_json: Optional[Path] = SummaryJsonOption,
    max_skipped_share: Optional[float] = typer.Option(None, "--max-skipped-share", help="Fail (exit 3, no output) "
                                                      "when more than this share (0-1) of the rows is skipped."),
    max_image_failure_share: Optional[float] = typer.Option(None, "--max-image-failure-share", help="Image bundles: "
                                                            "fail (exit 3, no output) when more than this share (0-1) "
                                                            "of the images fails [default: fail only if all fail]."),
    allow_empty: bool = typer.Option(False, "--allow-empty", help="Succeed when no product is tagged (an empty "
                                     "catalog, every row skipped) [default: exit 3, no output]."),
    escape_formulas: bool = typer.Option(False, "--escape-formulas", help="CSV: prefix values starting with = + - "
                                         "@ with ' so spreadsheets show them as text (changes those values)."),
    hosts: Optional[str] = ImageHostsOption,
    previous: Optional[Path] = typer.Option(None, "--previous", help="Last night's prediction file: copy the rows "
                                            "of products whose id and content are unchanged (same bundle and "
                                            "settings), tag only the others."),
    evidence: int = typer.Option(0, "--evidence", min=0, help="Per product, the N training products that voted "
                                 "most for its labels (evidence_ids, evidence_scores) [default: 0, off]."),
    calibrated: bool = typer.Option(False, "--calibrated", help="Keep only labels scoring at least their calibrated "
                                    "threshold (run `xmctag calibrate` first): products may get fewer than --top-k "
                                    "labels, or none."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="The catalog's current label table: warn when "
                                          "its labels or texts differ from the bundle's (see `xmctag relabel`)."),
    engine: str = typer.Option("local", "--engine", help="local (this process) or ray (Ray Data actors; the catalog "
                               "may also be a directory or glob of Parquet files; needs the ray extra)."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="--engine ray: the cluster to join (auto: "
                                              "the one running on this node; ray://HOST:10001) [default: a new "
                                              "local Ray]."),
    actors: Optional[int] = typer.Option(None, "--actors", min=1, help="--engine ray: actors [default: one per GPU "
                                         "with --device cuda, else one per 4 CPUs of the cluster, at least 1]."),
    quiet: bool = QuietOption,
):
    """Write the top-k labels of every product of a catalog."""
    from xmctag.summary import RunChecks
    from xmctag.tagger import Tagger
    from xmctag.tagging_run import check_options

    check_options(top_k, min_score)  # before the bundle is loaded
    checks = RunChecks(max_skipped_share, max_image_failure_share, allow_empty)
    allowed = image_hosts(hosts)
    if engine not in ("local", "ray"):
        raise UserError(f"--engine must be local or ray, not {engine!r}")
    if engine == "local" and (actors is not None or ray_address is not None):
        raise UserError("--actors and --ray-address need --engine ray")
    loader = Tagger.load
    if engine == "ray":
        from functools import partial

        from xmctag.engines.ray_engine import RayTagger

        loader = partial(RayTagger.load, address=ray_address, actors=actors)
    tagger = loader(model or newest_bundle(DEFAULT_EXPORT_DIR), device=device, precision=precision,
                    exclusive_groups=exclusive_groups, calibrated=calibrated)
    if labels is not None:
        from xmctag.cli_util import warn
        from xmctag.relabeller import label_table_warning

        if (mismatch := label_table_warning(tagger.bundle, labels)) is not None:
            warn(mismatch)
    summary = tagger.tag_file(catalog, output, top_k=top_k, fmt=fmt, min_score=min_score, batch_size=batch_size,
                              strict=strict, progress=not quiet, cache_dir=cache_dir, workers=workers, checks=checks,
                              summary_json=summary_json, escape_formulas=escape_formulas, image_hosts=allowed,
                              previous=previous, evidence=evidence)
    skipped = ", ".join(f"{n} ({reason})" for reason, n in summary.skipped.items()) or "0"
    err_console.print(f"tagged {summary.rows_tagged} of {summary.rows_read} rows in {summary.seconds:.1f}s "
                      f"({summary.products_per_second:,.0f} products/s, {tagger.device}); skipped {skipped}; "
                      f"wrote {summary.output}", highlight=False, soft_wrap=True)
    if summary.incremental is not None:
        from xmctag.incremental import IncrementalCounts

        err_console.print(IncrementalCounts(**summary.incremental).line(), highlight=False, soft_wrap=True)
    if calibrated:
        from xmctag.calibration import summary_line

        err_console.print(summary_line(summary, tagger, min_score), highlight=False, soft_wrap=True)
    elif summary.without_labels:
        err_console.print(f"{summary.without_labels} products had no label above --min-score {min_score} (Parquet: "
                          "an empty list; CSV/JSONL: no rows)", highlight=False, soft_wrap=True)
    if summary.images is not None:
        from xmctag.vision.tagging import summary_lines  # counts, then each kind of failure with an example row

        err_console.print("\n".join(summary_lines(summary.images, summary.image_cache)), highlight=False,
                          soft_wrap=True)
    if show:
        print_examples(tagger, catalog, summary.output, show, summary.top_k)


@app.command()
@user_errors
def calibrate(
    bundle: Path = typer.Argument(..., help="Bundle directory to calibrate (updated in place unless --out)."),
    dev: Path = typer.Option(..., "--dev", help="Dev catalog with true labels (Parquet: the model's text columns "
                             "and its labels column), not used in training."),
    precision: float = typer.Option(0.9, "--precision", help="Target precision of the labels kept (0-1)."),
    top_k: int = typer.Option(20, "--top-k", min=1, help="Labels per dev product the thresholds choose from."),
    seed: int = typer.Option(0, "--seed", help="Seed of the split of dev into fit and held-out halves."),
    min_positives: int = typer.Option(20, "--min-positives", min=1, help="Dev positives (and predictions) a label "
                                      "needs in the fit half for a threshold of its own; others share their "
                                      "frequency band's, else a global one."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write a calibrated copy here (a new or empty "
                                       "directory) and leave BUNDLE as it is."),
    device: str = DeviceOption,
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON instead of a table."),
    quiet: bool = QuietOption,
):
    """Fit score thresholds that reach a target precision on dev, store them in the bundle (`tag --calibrated`)."""
    from xmctag.calibration import REPORT_CAPTION, REPORT_COLUMNS, report_rows
    from xmctag.calibration import calibrate as calibrate_api

    report = calibrate_api(bundle, dev, precision=precision, top_k=top_k, seed=seed, min_positives=min_positives,
                           out=out, device=device, progress=not quiet)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
        return
    from rich.table import Table

    table = Table(caption=REPORT_CAPTION)
    for i, column in enumerate(REPORT_COLUMNS):
        table.add_column(column, justify="left" if i == 0 else "right", no_wrap=True)
    for row in report_rows(report):
        table.add_row(*row)
    out_console.print(table)
    for line in report.lines():
        out_console.print(escape(line), highlight=False, soft_wrap=True)


@app.command()
@user_errors
def relabel(
    bundle: Path = typer.Argument(..., help="Bundle written by `xmctag export` (or an earlier relabel)."),
    labels: Path = typer.Argument(..., help="The new label table (Parquet or CSV, the columns training read)."),
    out: Path = typer.Option(..., "--out", help="Bundle directory to write."),
    vectors: str = typer.Option("ridge", "--vectors", help="New labels' vectors from their text embeddings: ridge "
                                "(a linear map fitted on the trained labels), scaled (one scale and bias) or text."),
    votes: bool = typer.Option(True, "--votes/--no-votes", help="Give new labels the training products their "
                               "vectors score highest, so that they get neighbour votes as trained labels do."),
    min_products: int = typer.Option(5, "--min-products", min=0, help="With --votes: each new label gets at least "
                                     "its N best training products."),
    refit: bool = typer.Option(True, "--refit/--no-refit", help="With --votes: remake new labels' vectors from "
                               "their text and the training products voting for them."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the bundle in --out (only an xmctag bundle, "
                                   "and not the source bundle or one holding the table)."),
    quiet: bool = QuietOption,
):
    """Write a bundle for a new label table without retraining: kept labels keep their vectors, new labels get
    vectors from their text, retired labels disappear."""
    from xmctag.relabeller import relabel as relabel_api

    report = relabel_api(bundle, labels, out, overwrite=overwrite, vectors=vectors, votes=votes,
                         min_products=min_products, refit=refit, progress=not quiet)
    err_console.print(report.line(), highlight=False, soft_wrap=True)


@app.command("eval")
@user_errors
def eval_(
    predictions: Path = typer.Argument(..., help="Prediction file written by `xmctag tag`."),
    truth: Path = typer.Option(..., "--truth", help="Catalog with the true labels (id, labels)."),
    train: Optional[Path] = typer.Option(None, "--train", help="Training catalog, for PSP propensities."),
    k: str = typer.Option("1,3,5", "--k", help="Cut-offs, comma-separated."),
    psp_a: float = typer.Option(0.55, "--psp-a"),
    psp_b: float = typer.Option(1.5, "--psp-b"),
    id_col: str = typer.Option("id", "--id-col"),
    labels_col: str = typer.Option("labels", "--labels-col"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
):
    """P@k, nDCG@k, PSP@k and R@k of a prediction file."""
    from xmctag.evaluation.predictions import evaluate_predictions

    try:
        ks = tuple(sorted({int(x) for x in split_list(k) or []}))
    except ValueError:
        raise UserError(f"--k must be comma-separated integers, not {k!r}") from None
    if not ks or min(ks) < 1:
        raise UserError("--k needs cut-offs >= 1")
    report = evaluate_predictions(predictions, truth, train, ks, psp_a, psp_b, id_col, labels_col)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
        return
    # The header as plain lines (a table title would wrap to the table's width)
    out_console.print(f"{escape(str(predictions))} vs {escape(str(truth))} ({report.rows} rows)\n"
                      f"PSP propensities from {escape(report.propensity_source)}", highlight=False, soft_wrap=True)
    print_metrics(report.metrics, title=None)
    for note in report.notes:
        err_console.print(f"note: {escape(note)}", highlight=False, soft_wrap=True)


@app.command("diff")
@user_errors
def diff_(
    old: Path = typer.Argument(..., help="The earlier prediction file (Parquet, CSV or JSON Lines from `tag`)."),
    new: Path = typer.Argument(..., help="The later prediction file (any of those formats)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON instead of tables."),
    html: Optional[Path] = typer.Option(None, "--html", help="Also write the report as a self-contained HTML page "
                                        "(plots included) to this file."),
    top: int = typer.Option(10, "--top", min=1, help="Labels listed each way among the top movers, and example "
                            "products of each kind."),
):
    """What changed between two prediction files: products added, removed, re-tagged; labels gained and lost;
    scores."""
    from xmctag.reports.diff import diff_predictions
    from xmctag.reports.html import check_html_output, write_html

    if html is not None:
        check_html_output(html, [old, new])
    report = diff_predictions(old, new, top=top)
    if html is not None:
        write_html(report, html)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        from xmctag.reports.table import print_report

        print_report(report.to_dict(), out_console)
    if html is not None:
        err_console.print(f"wrote {escape(str(html))}", highlight=False, soft_wrap=True)


@app.command("embed-images")
@user_errors
def embed_images(
    catalog: Path = typer.Argument(..., help="Parquet catalog with an image column."),
    image_col: str = typer.Option("image", "--image-col", help="Bytes, relative paths, file:// or http(s) URLs."),
    vision: str = typer.Option(DEFAULT_VISION_ENCODER, "--vision", help="Frozen vision encoder (+colour: with a "
                               "colour histogram); the one training uses."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Default: $XMCTAG_CACHE_DIR or "
                                             "~/.cache/xmctag."),
    max_images: int = typer.Option(1, "--max-images", help="Images per product (list columns)."),
    workers: int = WorkersOption,
    hosts: Optional[str] = ImageHostsOption,
    quiet: bool = QuietOption,
):
    """Precompute the image-embedding cache of a catalog (only new or changed images are embedded)."""
    from xmctag.vision.embed import embed_images as embed_api

    summary = embed_api(catalog, image_col=image_col, encoder=vision, cache_dir=cache_dir, max_images=max_images,
                        workers=workers, progress=not quiet, image_hosts=image_hosts(hosts))
    for line in summary.lines():
        err_console.print(line, highlight=False, soft_wrap=True)


@app.command()
@user_errors
def convert(
    source: Path = typer.Argument(..., help="Directory with trn.raw.json.gz, tst.raw.json.gz, lbl.raw.json.gz."),
    out: Path = typer.Option(..., "--out", help="Directory for train.parquet, test.parquet, labels.parquet."),
):
    """Convert an Extreme Classification Repository raw dataset (e.g. LF-AmazonTitles-131K) to xmctag's format."""
    from xmctag.convert import convert_xc_raw

    result = convert_xc_raw(source, out)
    for name, rows in result.written.items():
        skipped = result.duplicates_skipped.get(name)
        err_console.print(f"{out / name}: {rows} rows" + (f" ({skipped} lines skipped: uid already seen)" if skipped
                                                              else ""), highlight=False, soft_wrap=True)


def main() -> None:
    warnings.showwarning = show_warning
    terminate_on_sigterm()
    app()


if __name__ == "__main__":
    main()
