"""The CLI contract end to end: train -> export -> tag -> eval, and bad input as one-line errors."""

import json

import polars as pl
import pytest
from typer.testing import CliRunner

from xmctag.cli import app

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    return result


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, catalog_dir, tiny_encoder_dir):
    work = tmp_path_factory.mktemp("cli")
    config = work / "small.toml"
    config.write_text("[xmctag]\nbatch_size = 32\nlr = 1e-3\nwarmup_steps = 5\nmax_length = 16\n"
                      "label_max_length = 12\ncluster_size = 8\nlabel_vector_epochs = 10\n")
    result = invoke("train", "--train", catalog_dir / "train.parquet", "--labels", catalog_dir / "labels.parquet",
                    "--dev", catalog_dir / "dev.parquet", "--out", work / "runs" / "tiny", "--encoder",
                    tiny_encoder_dir, "--epochs", 2, "--classifier-epochs", 1, "--config", config, "--quiet")
    assert result.exit_code == 0, result.output
    return work


def test_train_export_tag_eval(cli_run, catalog_dir, monkeypatch):
    monkeypatch.chdir(cli_run)
    saved = json.loads((cli_run / "runs/tiny/config.json").read_text())
    assert saved["epochs"] == 2 and saved["batch_size"] == 32  # flags and TOML both land in the saved config
    assert saved["classifier_epochs"] == 1

    result = invoke("export", "runs/tiny", "--quiet")
    assert result.exit_code == 0, result.output
    assert (cli_run / "export/tiny/manifest.json").exists()  # default --out is export/<run name>

    result = invoke("tag", catalog_dir / "dev.parquet", "--top-k", 5, "--output", "preds.parquet", "--quiet",
                    "--show", 2)
    assert result.exit_code == 0, result.output
    assert "tagged 80 of 80 rows" in result.output
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
    for name in ("P@1", "P@5", "nDCG@5", "PSP@5"):  # the bundle on ONNX Runtime reproduces training's dev eval
        assert report["metrics"][name] == pytest.approx(train_metrics[name], abs=0.02)

    result = invoke("eval", "preds.parquet", "--truth", catalog_dir / "dev.parquet", "--train",
                    catalog_dir / "train.parquet")
    assert result.exit_code == 0 and "PSP" in result.stdout and "@5" in result.stdout


def test_tag_csv_evaluates_like_parquet(cli_run, catalog_dir, monkeypatch):
    monkeypatch.chdir(cli_run)
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
def test_user_errors_are_one_line_with_exit_code_2(cli_run, catalog_dir, monkeypatch, args, message):
    monkeypatch.chdir(cli_run)
    invoke("tag", catalog_dir / "dev.parquet", "--model", "export/tiny", "--output", "p.parquet", "--quiet")
    args = [a.format(dev=catalog_dir / "dev.parquet", labels=catalog_dir / "labels.parquet") for a in args]
    result = invoke(*args)
    assert result.exit_code == 2
    assert message in result.output.replace("\n", " ")
    assert "Traceback" not in result.output


def test_tag_without_model_and_without_bundles_says_what_to_do(tmp_path, catalog_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("tag", catalog_dir / "dev.parquet")
    assert result.exit_code == 2 and "no bundle in ./export" in result.output
