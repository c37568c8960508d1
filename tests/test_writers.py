"""io/writers: Parquet, CSV and JSONL outputs hold the same predictions; the format follows the extension; an
output that cannot be written fails before any tagging."""

from pathlib import Path

import polars as pl
import pytest
from conftest import write_catalog

from xmctag import UserError
from xmctag.summary import RunChecks

TITLES = ["acme red shirt", "zeta blue jeans with a much longer title than the others, and more words", "cap",
          "nova white watch", "orbit pink dress", "lumen grey belt", "acme black socks and a yellow bag"]


def exploded(tagger, parquet) -> pl.DataFrame:
    """A Parquet prediction file in the CSV/JSONL layout: one row per (product, rank), with the label's text."""
    texts = pl.DataFrame({"label": tagger.label_ids.tolist(), "label_text": tagger.label_texts.tolist()})
    return (pl.read_parquet(parquet).with_columns(rank=pl.int_ranges(1, pl.col("labels").list.len() + 1))
            .explode("labels", "scores", "rank").drop_nulls("labels")
            .rename({"labels": "label", "scores": "score"})
            .join(texts, on="label", how="left", maintain_order="left")
            .select("id", pl.col("rank").cast(pl.Int64), "label", "label_text", "score"))


@pytest.mark.parametrize("min_score", [None, 0.5])
def test_long_formats_hold_the_parquet_predictions_row_by_row(tagger, tmp_path, min_score):
    titles = TITLES * 3 + ["umbrella"]
    catalog = write_catalog(tmp_path / "cat.parquet", titles)
    for fmt in ("parquet", "csv", "jsonl"):
        tagger.tag_file(catalog, tmp_path / f"out.{fmt}", top_k=3, batch_size=4, min_score=min_score,
                        progress=False)
    expected = exploded(tagger, tmp_path / "out.parquet")
    assert expected.height == 3 * len(titles) if min_score is None else 0 < expected.height < 3 * len(titles)
    for out in (pl.read_csv(tmp_path / "out.csv"), pl.read_ndjson(tmp_path / "out.jsonl")):
        assert out.columns == ["id", "rank", "label", "label_text", "score", "bundle_id", "bundle", "content_hash"]
        got = out.select("id", pl.col("rank").cast(pl.Int64), "label", "label_text",
                         pl.col("score").cast(pl.Float32))
        assert got.equals(expected), (got, expected)  # same rows, same order, same float32 scores
        assert (out["bundle_id"] == tagger.bundle_id).all()
        assert (out["bundle"] == str(tagger.path.resolve())).all()


def test_an_unwritable_output_fails_before_any_tagging(tagger, tmp_path, monkeypatch):
    from xmctag import tagger as tagger_module

    catalog = write_catalog(tmp_path / "cat.parquet", TITLES)

    def no_reading(*args, **kwargs):
        raise AssertionError("the catalog was read before the output was checked")

    monkeypatch.setattr(tagger_module, "read_batches", no_reading)
    with pytest.raises(UserError, match="--output .*nowhere/x.parquet: directory .*nowhere does not exist"):
        tagger.tag_file(catalog, tmp_path / "nowhere" / "x.parquet", progress=False)

    def denied(*args, **kwargs):  # a read-only directory, even when the tests run as root
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("xmctag.io.atomic.tempfile.mkstemp", denied)
    with pytest.raises(UserError, match=r"--output .*out.parquet: cannot write in .* \(Permission denied\)"):
        tagger.tag_file(catalog, tmp_path / "out.parquet", progress=False)
    assert list(tmp_path.iterdir()) == [catalog]


def test_an_output_in_a_read_only_file_system_fails_before_any_tagging(tagger, tmp_path, sys_is_unwritable):
    if not sys_is_unwritable:
        pytest.skip("/sys is writable here")
    catalog = write_catalog(tmp_path / "cat.parquet", TITLES)
    with pytest.raises(UserError, match=r"--output /sys/x.parquet: cannot write in /sys \("):
        tagger.tag_file(catalog, "/sys/x.parquet", progress=False)
    assert not Path("/sys/x.parquet").exists()


@pytest.mark.parametrize("name,fmt,expected", [
    ("out.csv", None, "csv"), ("out.jsonl", None, "jsonl"), ("out.ndjson", None, "jsonl"),
    ("out.parquet", None, "parquet"), ("out.data", None, "parquet"), ("out.data", "csv", "csv"),
    ("OUT.CSV", "csv", "csv"), (None, None, "parquet"), (None, "jsonl", "jsonl"),
])
def test_format_follows_the_output_extension(tagger, tmp_path, name, fmt, expected):
    from xmctag.io.predictions import read_predictions

    catalog = write_catalog(tmp_path / "cat.parquet", TITLES)
    summary = tagger.tag_file(catalog, tmp_path / name if name else None, top_k=2, fmt=fmt, progress=False)
    if name is None:
        assert summary.output == tmp_path / f"cat.predictions.{expected}"
    head = summary.output.read_bytes()[:4]
    assert {b"PAR1": "parquet", b"id,r": "csv", b'{"id': "jsonl"}[head] == expected
    assert read_predictions(summary.output)["labels"].list.len().to_list() == [2] * len(TITLES)


@pytest.mark.parametrize("name,fmt", [("out.parquet", "csv"), ("out.csv", "parquet"), ("out.jsonl", "csv"),
                                      ("out.json", "parquet")])
def test_a_format_that_contradicts_the_extension_is_an_error(tagger, tmp_path, name, fmt):
    catalog = write_catalog(tmp_path / "cat.parquet", TITLES)
    with pytest.raises(UserError, match=rf"--format {fmt} does not match --output .*{name}"):
        tagger.tag_file(catalog, tmp_path / name, fmt=fmt, progress=False)
    assert list(tmp_path.iterdir()) == [catalog]


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_a_run_that_tags_nothing_writes_a_file_eval_reads(tagger, tmp_path, fmt):
    from xmctag.evaluation.predictions import evaluate_predictions

    pl.DataFrame({"id": ["a", "b"], "labels": [["colour:red"], ["article:cap"]]}).write_parquet(tmp_path / "t.parquet")
    empty = pl.DataFrame({"id": [], "title": []}, schema={"id": pl.String, "title": pl.String})
    empty.write_parquet(tmp_path / "none.parquet")
    pl.DataFrame({"id": ["a", "b"], "title": [None, " "]}).write_parquet(tmp_path / "no-text.parquet")
    for name in ("none", "no-text"):
        output = tmp_path / f"{name}.out.{fmt}"
        summary = tagger.tag_file(tmp_path / f"{name}.parquet", output, top_k=3, progress=False,
                                  checks=RunChecks(allow_empty=True))
        assert summary.rows_tagged == 0
        if fmt == "csv":
            assert output.read_text() == "id,rank,label,label_text,score,bundle_id,bundle,content_hash\n"
        report = evaluate_predictions(output, tmp_path / "t.parquet")
        assert report.rows == 2 and report.rows_without_predictions == 2 and report.metrics["P@1"] == 0.0
        assert report.notes == ["2 truth rows had no predictions (scored 0)"]
