"""The CLI contract end to end: train -> export -> tag -> eval, and bad input as one-line errors."""

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from xmctag.cli import app

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    return result


@pytest.fixture()
def cli_run(tmp_path, monkeypatch, trained_run, tiny_bundle):
    """A working directory of the test's own, as a user's after `xmctag train --out runs/tiny` and `xmctag export
    runs/tiny`: runs/tiny and export/tiny link to the shared run and bundle (read-only: a test that changes them
    fails), and the test runs in it."""
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs/tiny").symlink_to(trained_run, target_is_directory=True)
    (tmp_path / "export").mkdir()
    (tmp_path / "export/tiny").symlink_to(tiny_bundle, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def parquet_metadata(path) -> dict[str, str]:
    """The ``xmctag.*`` key-value metadata of a prediction Parquet file (README: "Prediction files")."""
    import pyarrow.parquet as pq

    raw = pq.read_schema(path).metadata or {}
    return {k.decode().removeprefix("xmctag."): v.decode() for k, v in raw.items() if k.startswith(b"xmctag.")}


@pytest.mark.e2e
def test_train_flags_and_config_file_land_in_the_saved_run(tmp_path, catalog_dir, tiny_encoder_dir):
    config = tmp_path / "small.toml"
    config.write_text("[xmctag]\nbatch_size = 32\nlr = 1e-3\nwarmup_steps = 5\nmax_length = 16\n"
                      "label_max_length = 12\ncluster_size = 8\nlabel_vector_epochs = 2\nepochs = 7\n")
    pl.read_parquet(catalog_dir / "train.parquet").head(64).write_parquet(tmp_path / "train.parquet")
    result = invoke("train", "--train", tmp_path / "train.parquet", "--labels", catalog_dir / "labels.parquet",
                    "--dev", catalog_dir / "dev.parquet", "--out", tmp_path / "runs/tiny", "--encoder",
                    tiny_encoder_dir, "--epochs", 1, "--classifier-epochs", 1, "--config", config, "--quiet")
    assert result.exit_code == 0, result.output
    assert f"model written to {tmp_path / 'runs/tiny'}" in " ".join(result.stderr.split())
    assert f"dev ({catalog_dir / 'dev.parquet'})" in " ".join(result.stdout.split()) and "nDCG" in result.stdout
    saved = json.loads((tmp_path / "runs/tiny/config.json").read_text())
    assert saved["epochs"] == 1 and saved["classifier_epochs"] == 1  # flags win over the file
    assert (saved["batch_size"], saved["label_vector_epochs"], saved["max_length"]) == (32, 2, 16)  # the file
    metrics = json.loads((tmp_path / "runs/tiny/metrics.json").read_text())
    assert [h.get("epoch") or h.get("classifier_epoch") for h in metrics["history"]] == [1, 1, None]


def test_train_export_tag_eval(cli_run, trained_run, tiny_bundle, catalog_dir):
    # The shared run, as `xmctag train` trains it (the API that command calls, with the same settings), is exported
    # to the default --out, export/<run name>, which holds an older bundle (here: the shared one, marked): refused
    # without --overwrite, replaced by a valid new bundle with it.
    (cli_run / "export/tiny").unlink()
    shutil.copytree(tiny_bundle, cli_run / "export/tiny")
    old = cli_run / "export/tiny/manifest.json"
    old.write_text(json.dumps({**json.loads(old.read_text()), "bundle_id": "0" * 16, "created": "2000-01-01"}))
    result = invoke("export", "runs/tiny", "--quiet")
    assert result.exit_code == 2 and "not empty (use --overwrite" in result.stderr
    assert json.loads(old.read_text())["bundle_id"] == "0" * 16  # refused: untouched
    result = invoke("export", "runs/tiny", "--overwrite", "--quiet")
    assert result.exit_code == 0, result.output
    manifest = json.loads((cli_run / "export/tiny/manifest.json").read_text())
    assert manifest["bundle_id"] != "0" * 16 and manifest["created"] != "2000-01-01"
    assert manifest["source_run"] == str(trained_run.resolve())
    assert sorted(p.name for p in (cli_run / "export").iterdir()) == ["tiny"]  # no staging directory left

    result = invoke("tag", catalog_dir / "dev.parquet", "--top-k", 5, "--output", "preds.parquet", "--quiet",
                    "--show", 2)
    assert result.exit_code == 0, result.output
    assert "tagged 80 of 80 rows" in result.output  # the new bundle loads (its hashes verify) and tags
    assert parquet_metadata(cli_run / "preds.parquet")["bundle_id"] == manifest["bundle_id"]
    preds = pl.read_parquet(cli_run / "preds.parquet")
    assert preds.height == 80 and (preds["labels"].list.len() == 5).all()
    # --exclusive-groups: one colour and one article each (training found both facets exclusive; README, "Facets")
    result = invoke("tag", catalog_dir / "dev.parquet", "--top-k", 5, "--output", "facets.parquet", "--quiet",
                    "--exclusive-groups")
    facets = pl.read_parquet(cli_run / "facets.parquet")
    assert result.exit_code == 0 and (facets["labels"].list.len() == 2).all()
    assert (facets["labels"].list.eval(pl.element().str.split(":").list.first()).list.sort()
            .list.join(",") == "article,colour").all()
    assert facets["labels"].list.first().to_list() == preds["labels"].list.first().to_list()

    result = invoke("eval", "preds.parquet", "--truth", catalog_dir / "dev.parquet", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["rows"] == 80 and report["metrics"]["P@1"] > 0.9
    assert report["propensity_source"].startswith("training counts of bundle")
    train_metrics = json.loads((cli_run / "runs/tiny/metrics.json").read_text())["dev"]
    # The bundle on ONNX Runtime + faiss reproduces training's dev evaluation (PyTorch + exact scoring): the same
    # ranking of every product, and the same metric code (and training counts) on it, so the same numbers to the
    # last bit. (Measured: every difference 0.0. A tolerance would only hide a changed ranking or propensity.)
    assert set(report["metrics"]) == set(train_metrics)  # P, nDCG, PSP and R at 1, 3, 5
    assert report["metrics"] == train_metrics

    result = invoke("eval", "preds.parquet", "--truth", catalog_dir / "dev.parquet", "--train",
                    catalog_dir / "train.parquet")
    assert result.exit_code == 0 and "PSP" in result.stdout and "@5" in result.stdout


def test_tag_without_model_uses_the_newest_bundle_in_export(tmp_path, tiny_bundle, catalog_dir, monkeypatch):
    import os

    from xmctag.manifest import seal

    monkeypatch.chdir(tmp_path)
    ids = {}
    for name, weight in (("a", 0.5), ("b", 0.4)):  # two bundles with different ids: b votes less
        shutil.copytree(tiny_bundle, tmp_path / "export" / name)
        manifest = json.loads((tmp_path / "export" / name / "manifest.json").read_text())
        manifest["scoring"]["knn_weight"] = weight
        ids[name] = seal(tmp_path / "export" / name, manifest)["bundle_id"]
    assert ids["a"] != ids["b"]
    for newest, older in (("a", "b"), ("b", "a")):  # not the alphabetical first or last: the newest
        os.utime(tmp_path / "export" / older / "manifest.json", (1_000_000_000, 1_000_000_000))
        os.utime(tmp_path / "export" / newest / "manifest.json", (1_500_000_000, 1_500_000_000))
        result = invoke("tag", catalog_dir / "dev.parquet", "-o", f"{newest}.parquet", "--quiet")
        assert result.exit_code == 0, result.output
        assert f"using model bundle {Path('export') / newest}" in result.stderr
        metadata = parquet_metadata(tmp_path / f"{newest}.parquet")
        assert metadata["bundle_id"] == ids[newest]
        assert metadata["bundle"] == str((tmp_path / "export" / newest).resolve())


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_an_interrupted_tag_exits_130_and_writes_nothing(cli_run, catalog_dir, writer_spy, fmt):
    (cli_run / f"kept.{fmt}").write_text("previous predictions")
    before = sorted(p.name for p in cli_run.iterdir())
    writer_spy.interrupt_at = 2  # Ctrl-C while tagging, after the first batch went to the temporary file
    for output in (f"out.{fmt}", f"kept.{fmt}"):
        writer_spy.rows.clear()
        result = invoke("tag", catalog_dir / "dev.parquet", "--model", "export/tiny", "-o", output, "--batch-size",
                        20, "--quiet")
        assert result.exit_code == 130, result.output
        assert result.stderr.strip() == "interrupted"
        assert writer_spy.rows == [20]  # stopped mid-catalog (80 rows), one batch written
        assert sorted(p.name for p in cli_run.iterdir()) == before  # no output, no temporary file
    assert (cli_run / f"kept.{fmt}").read_text() == "previous predictions"  # an earlier output survives


def test_tag_with_the_int8_graph_agrees_with_fp32(cli_run, catalog_dir):
    for precision in ("fp32", "int8"):
        result = invoke("tag", catalog_dir / "dev.parquet", "--model", "export/tiny", "--precision", precision,
                        "-o", f"{precision}.parquet", "--top-k", 5, "--quiet")
        assert result.exit_code == 0, result.output
    fp32, int8 = (pl.read_parquet(cli_run / f"{p}.parquet") for p in ("fp32", "int8"))
    assert fp32["id"].to_list() == int8["id"].to_list()
    shared = [len(set(a) & set(b)) / 5 for a, b in zip(fp32["labels"].to_list(), int8["labels"].to_list())]
    assert np.mean(shared) >= 0.8 and min(shared) >= 0.6, shared
    assert fp32["labels"].list.first().to_list() == int8["labels"].list.first().to_list()  # the best label


def test_tag_csv_evaluates_like_parquet(cli_run, catalog_dir):
    for fmt in ("parquet", "csv"):
        result = invoke("tag", catalog_dir / "dev.parquet", "--model", "export/tiny", "--format", fmt, "--output",
                        f"p.{fmt}", "--quiet")
        assert result.exit_code == 0, result.output
    reports = [json.loads(invoke("eval", f"p.{fmt}", "--truth", catalog_dir / "dev.parquet", "--train",
                                 catalog_dir / "train.parquet", "--json").stdout) for fmt in ("parquet", "csv")]
    assert reports[0]["metrics"] == pytest.approx(reports[1]["metrics"])


@pytest.mark.parametrize("args,message", [
    (["tag", "missing.parquet", "--model", "export/tiny"], "missing.parquet: no such file"),
    (["tag", "{dev}", "--model", "runs/tiny"], "training run, not a bundle"),
    (["tag", "{dev}", "--model", "nowhere"], "no such bundle"),
    (["eval", "nothing.parquet", "--truth", "{dev}"], "nothing.parquet: no such file"),
    (["eval", "p.parquet", "--truth", "{dev}", "--k", "a,b"], "--k must be"),
    (["train", "--train", "{dev}", "--labels", "{dev}", "--out", "runs/x"], "missing column(s) label, text"),
    (["train", "--train", "{dev}", "--labels", "{labels}", "--out", "runs/tiny"], "not empty"),
    (["export", "runs/nothing"], "not a finished xmctag run"),
    # printed as written: rich would take "[gpu]" for markup and drop it
    (["tag", "{dev}", "--model", "export/tiny", "--device", "cuda"], "install 'xmctag[gpu]' on a CUDA machine"),
])
def test_user_errors_are_one_line_with_exit_code_2(cli_run, catalog_dir, args, message):
    if "p.parquet" in args:  # a real prediction file, so that the error is the option's
        assert invoke("tag", catalog_dir / "dev.parquet", "--model", "export/tiny", "--output", "p.parquet",
                      "--quiet").exit_code == 0
    args = [a.format(dev=catalog_dir / "dev.parquet", labels=catalog_dir / "labels.parquet") for a in args]
    result = invoke(*args)
    assert result.exit_code == 2
    assert message in result.output.replace("\n", " ")
    assert "Traceback" not in result.output


def test_tag_without_model_and_without_bundles_says_what_to_do(tmp_path, catalog_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("tag", catalog_dir / "dev.parquet")
    assert result.exit_code == 2 and "no bundle in ./export" in result.output


@pytest.fixture()
def bad_inputs(cli_run, catalog_dir):
    """Files with the mistakes users make, in cli_run/bad (the bundle is cli_run/export/tiny)."""
    bad = cli_run / "bad"
    bad.mkdir()
    dev = pl.read_parquet(catalog_dir / "dev.parquet")
    dev.with_columns(pl.col("title").str.split(" ")).write_parquet(bad / "list-title.parquet")
    dev.with_columns(pl.struct("title").alias("id")).write_parquet(bad / "struct-id.parquet")
    dev.drop("labels").write_csv(bad / "catalog.csv")
    dev.with_columns(pl.col("labels").list.join(",")).write_csv(bad / "truth.csv")
    broken = bad / "bundle"
    shutil.copytree(cli_run / "export/tiny", broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    (broken / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "files"}))
    ids = [None, "", *dev["id"].to_list()[2:]]
    dev.with_columns(pl.Series("id", ids, pl.String)).write_parquet(bad / "no-ids.parquet")
    return bad


@pytest.mark.parametrize("args,message", [
    (["tag", "{bad}/list-title.parquet"], "{bad}/list-title.parquet: column 'title' has type List(String); expected "
                                          "product text"),
    (["tag", "{bad}/struct-id.parquet"], "{bad}/struct-id.parquet: column 'id' has type Struct"),
    (["tag", "{bad}/catalog.csv"], "{bad}/catalog.csv: not a Parquet file (xmctag tag reads Parquet catalogs)"),
    (["tag", "{dev}", "-o", "/sys/x.parquet"], "--output /sys/x.parquet: cannot write in /sys ("),
    (["tag", "{dev}", "-o", "{bad}/nowhere/x.parquet"], "--output {bad}/nowhere/x.parquet: directory"),
    (["tag", "{dev}", "--format", "csv", "-o", "{bad}/out.parquet"], "--format csv does not match --output "
                                                                     "{bad}/out.parquet"),
    (["tag", "{dev}", "--model", "{bad}/bundle"], "{bad}/bundle/manifest.json: missing key 'files' (re-export the "
                                                  "bundle)"),
    (["eval", "{bad}/p.parquet", "--truth", "{bad}/truth.csv"], "{bad}/truth.csv: column 'labels' has type String; "
                                                                "expected a list of label ids"),
    (["eval", "{bad}/p.parquet", "--truth", "{dev}", "--train", "{bad}/truth.csv"], "{bad}/truth.csv: column "
                                                                                     "'labels' has type String"),
    (["eval", "{bad}/p.parquet", "--truth", "{bad}/list-title.parquet", "--labels-col", "title", "--id-col",
      "labels"], "{bad}/list-title.parquet: column 'labels' has type List(String); expected a product id"),
])
def test_bad_input_is_one_line_on_stderr_naming_the_file(bad_inputs, catalog_dir, sys_is_unwritable, args, message):
    if "/sys/x.parquet" in args and not sys_is_unwritable:
        pytest.skip("/sys is writable here")
    bad, dev = bad_inputs, catalog_dir / "dev.parquet"
    if not (bad / "p.parquet").exists():
        assert invoke("tag", dev, "--model", bad.parent / "export/tiny", "-o", bad / "p.parquet", "--quiet") \
            .exit_code == 0
    if args[0] == "tag" and "--model" not in args:
        args = [*args, "--model", bad.parent / "export/tiny"]
    before = set(bad.iterdir())
    result = invoke(*[str(a).format(bad=bad, dev=dev) for a in args])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message.format(bad=bad) in lines[0]
    assert "Traceback" not in result.output
    assert set(bad.iterdir()) == before  # nothing written, not even a temporary file


def test_skipped_rows_and_propensity_source_are_reported(bad_inputs, catalog_dir):
    bad = bad_inputs
    result = invoke("tag", bad / "no-ids.parquet", "--model", bad.parent / "export/tiny", "-o", bad / "ids.jsonl",
                    "--quiet")
    assert result.exit_code == 0, result.output
    assert "tagged 78 of 80 rows" in result.stderr and "skipped 2 (no id)" in result.stderr
    assert pl.read_ndjson(bad / "ids.jsonl")["rank"].max() == 5  # jsonl, from the extension
    result = invoke("tag", bad / "no-ids.parquet", "--model", bad.parent / "export/tiny", "-o", bad / "s.parquet",
                    "--quiet", "--strict")
    assert result.exit_code == 2 and "no-ids.parquet: row 0 has no id in column 'id' (--strict)" in result.stderr
    result = invoke("eval", bad / "ids.jsonl", "--truth", catalog_dir / "dev.parquet")
    assert result.exit_code == 0, result.output
    assert "PSP propensities from training counts of bundle" in result.stdout.replace("\n", " ")


@pytest.mark.e2e
def test_train_reads_renamed_columns_and_a_csv_label_table(tmp_path, catalog_dir, tiny_encoder_dir):
    # The catalog and label table of a team whose columns have their own names: --id-col, --text-cols,
    # --labels-col and --label-cols map them; the label table is a CSV with a synonym column.
    catalog = pl.read_parquet(catalog_dir / "train.parquet").rename({"id": "sku", "title": "name", "labels": "tags"})
    catalog.head(120).write_parquet(tmp_path / "train.parquet")
    labels = pl.read_parquet(catalog_dir / "labels.parquet")
    pl.DataFrame({"code": labels["label"], "name": labels["text"],
                  "also": ["aka " + x for x in labels["label"]]}).write_csv(tmp_path / "labels.csv")
    result = invoke("train", "--train", tmp_path / "train.parquet", "--labels", tmp_path / "labels.csv", "--out",
                    tmp_path / "run", "--encoder", tiny_encoder_dir, "--epochs", 0, "--classifier-epochs", 0,
                    "--id-col", "sku", "--text-cols", "name", "--labels-col", "tags", "--label-cols",
                    "code,name,also", "--max-length", 16, "--quiet")
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "run/config.json").read_text())
    assert (saved["id_col"], saved["text_cols"], saved["labels_col"]) == ("sku", ["name"], "tags")
    assert (saved["label_id_col"], saved["label_text_col"], saved["label_extra_cols"]) == ("code", "name", ["also"])
    trained_labels = pl.read_parquet(tmp_path / "run/labels.parquet")
    assert trained_labels["encoder_text"][0] == "colour: red ; aka colour:red"
    assert json.loads((tmp_path / "run/metrics.json").read_text())["n_train"] == 120
    result = runner.invoke(app, ["train", "--train", str(tmp_path / "train.parquet"), "--labels",
                                 str(tmp_path / "labels.csv"), "--out", str(tmp_path / "run2"), "--label-cols", "code"])
    assert result.exit_code == 2 and "--label-cols code: give at least the id and the text column" in result.output


def test_show_prints_ids_and_titles_as_written(bad_inputs):
    bad, model = bad_inputs, bad_inputs.parent / "export/tiny"
    pl.DataFrame({"id": ["p[/x]", "q", "p[/x]"], "title": ["[bold]acme red shirt", "blue jeans [/]", "cap"]}) \
        .write_parquet(bad / "markup.parquet")
    result = invoke("tag", bad / "markup.parquet", "--model", model, "-o", bad / "markup.out.csv", "--quiet",
                    "--top-k", 3, "--show", 3)
    assert result.exit_code == 0, result.output
    rows = [line.split("│")[1:3] for line in result.stdout.splitlines() if line.startswith("│ ") and "│ " in line[2:]]
    rows = [[cell.strip() for cell in row] for row in rows if row[0].strip()]  # the first line of each product
    assert rows == [["p[/x]", "[bold]acme red shirt"], ["q", "blue jeans [/]"], ["p[/x]", "cap"]]  # as written
    assert "top-3 labels of 3 products" in " ".join(result.stdout.split())  # the title may wrap
    result = invoke("tag", bad / "markup.parquet", "--model", model, "-o", bad / "x.parquet", "--show", -3)
    assert result.exit_code == 2 and "Invalid value for '--show'" in result.output
    assert not (bad / "x.parquet").exists()


@pytest.mark.parametrize("value", ["nan", "1.5", "-0.2"])
def test_min_score_outside_0_1_is_refused(bad_inputs, catalog_dir, value):
    result = invoke("tag", catalog_dir / "dev.parquet", "--model", bad_inputs.parent / "export/tiny", "-o",
                    bad_inputs / "ms.parquet", "--min-score", value)
    assert result.exit_code == 2 and result.stderr.startswith("error: --min-score must be between 0 and 1")
    assert not (bad_inputs / "ms.parquet").exists()


def test_min_score_counts_products_left_without_labels(bad_inputs, catalog_dir):
    result = invoke("tag", catalog_dir / "dev.parquet", "--model", bad_inputs.parent / "export/tiny", "-o",
                    bad_inputs / "ms.csv", "--min-score", 1, "--quiet")
    assert result.exit_code == 0, result.output
    assert "80 products had no label above --min-score 1.0 (Parquet: an empty list; CSV/JSONL: no rows)" in \
        result.stderr.replace("\n", " ")


def test_an_empty_run_writes_a_readable_file_and_eval_scores_it(bad_inputs, catalog_dir):
    bad, model, dev = bad_inputs, bad_inputs.parent / "export/tiny", catalog_dir / "dev.parquet"
    pl.read_parquet(dev).head(0).write_parquet(bad / "empty.parquet")
    result = invoke("tag", bad / "empty.parquet", "--model", model, "-o", bad / "empty.csv", "--quiet", "--show", 3,
                    "--allow-empty")
    assert result.exit_code == 0, result.output
    assert "tagged 0 of 0 rows" in result.stderr and "top-5 labels of 0 products" in " ".join(result.stdout.split())
    assert (bad / "empty.csv").read_text().startswith("id,rank,label")
    result = invoke("eval", bad / "empty.csv", "--truth", dev)
    assert result.exit_code == 0, result.output
    assert "note: 80 truth rows had no predictions (scored 0)" in result.stderr


def test_eval_k_beyond_the_predictions_is_noted_and_k_0_refused(bad_inputs, catalog_dir):
    bad, dev = bad_inputs, catalog_dir / "dev.parquet"
    assert invoke("tag", dev, "--model", bad.parent / "export/tiny", "-o", bad / "k.parquet", "--top-k", 3,
                  "--quiet").exit_code == 0
    result = invoke("eval", bad / "k.parquet", "--truth", dev, "--k", "1,10")
    assert result.exit_code == 0, result.output
    assert "note: k=10 exceeds the 3 labels predicted per product; P@10 counts the missing ones as wrong" in \
        result.stderr.replace("\n", " ")
    result = invoke("eval", bad / "k.parquet", "--truth", dev, "--k", "0")
    assert result.exit_code == 2 and "error: --k needs cut-offs >= 1" in result.stderr


def test_a_directory_as_catalog_is_named_as_such(bad_inputs):
    result = invoke("tag", bad_inputs, "--model", bad_inputs.parent / "export/tiny")
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {bad_inputs}: is a directory, not a Parquet file"


def test_help_shows_bracketed_defaults():
    # Rich markup would read "[default: ...]" in a help text as a style tag and drop it.
    result = invoke("tag", "--help")
    assert result.exit_code == 0 and "[default: newest in" in result.output


def test_resume_checks_a_config_file_like_flags(tmp_path, monkeypatch):
    # A resumed run keeps its saved settings: a --config that changes one is refused, as a changed flag is.
    from types import SimpleNamespace

    from xmctag import Config, run_dir
    from xmctag.training import trainer

    (tmp_path / "run").mkdir()
    Config(lr=1e-3).save(tmp_path / "run/config.json")
    (tmp_path / "lr.toml").write_text("lr = 0.01\n")
    (tmp_path / "same.toml").write_text("lr = 0.001\n")
    seen = []

    def fake_train(train, labels, out, config, resume, **kwargs):  # the API's own check, without training
        run_dir.check_resumed_config(out, config, resume)
        seen.append(config)
        return SimpleNamespace(dev_metrics=None, run_dir=out)

    monkeypatch.setattr(trainer, "train", fake_train)
    args = ["train", "--train", "t.parquet", "--labels", "l.parquet", "--out", tmp_path / "run", "--resume"]
    result = invoke(*args, "--config", tmp_path / "lr.toml")
    assert result.exit_code == 2 and "settings differ from the run being resumed: lr" in result.output
    assert invoke(*args, "--config", tmp_path / "same.toml").exit_code == 0 and seen[-1].lr == 1e-3
