"""tag --previous: a second night reuses the unchanged products and gives exactly the full run's output; the content
hash is stable; a previous file from other settings is not reused; a malformed one is an error naming it."""

import hashlib
import json

import polars as pl
import pyarrow.parquet as pq
import pytest
from conftest import write_catalog
from typer.testing import CliRunner

from xmctag import UserError
from xmctag.cli import app
from xmctag.incremental import content_hashes
from xmctag.io.predictions import read_prediction_products

COLOURS = ["red", "blue", "green", "black", "white", "yellow", "pink", "grey"]
ARTICLES = ["shirt", "jeans", "shoes", "watch", "bag", "dress", "jacket", "socks", "cap", "belt"]
TITLES = [f"acme {COLOURS[i % 8]} {ARTICLES[i % 10]}" + (" with a longer title" * (i % 3)) for i in range(40)]


def nights(tmp_path):
    """Night 1 (40 products) and night 2: 5 titles changed, 4 products removed, 3 added (one in the middle), one
    title only re-spaced (the same text once normalised: not a change)."""
    ids = [f"p{i}" for i in range(40)]
    night1 = write_catalog(tmp_path / "night1.parquet", TITLES, ids)
    titles2, ids2 = list(TITLES), list(ids)
    for i in (1, 7, 12, 20, 33):
        titles2[i] = titles2[i] + " in cotton"
    titles2[5] = "  " + titles2[5] + "  "
    for i in (30, 21, 3, 0):
        del titles2[i], ids2[i]
    titles2.insert(10, "zeta pink cap")
    ids2.insert(10, "new-a")
    titles2 += ["nova grey belt", "lumen blue watch"]
    ids2 += ["new-b", "new-c"]
    night2 = write_catalog(tmp_path / "night2.parquet", titles2, ids2)
    return night1, night2, {"reused": 40 - 5 - 4, "retagged": 5, "new": 3, "dropped": 4}


def counting_embeds(tagger, monkeypatch) -> list:
    """A list that gets the number of products of each ``embed`` call from now on."""
    calls = []
    embed = tagger.embed
    monkeypatch.setattr(tagger, "embed", lambda texts, *args: (calls.append(len(texts)), embed(texts, *args))[1])
    return calls


def assert_same_predictions(got, expected):
    assert got["id"].to_list() == expected["id"].to_list()  # same products, same (catalog) order
    assert got["labels"].to_list() == expected["labels"].to_list()
    assert got["content_hash"].to_list() == expected["content_hash"].to_list()
    for a, b in zip(got["scores"].to_list(), expected["scores"].to_list()):
        assert len(a) == len(b) and max((abs(x - y) for x, y in zip(a, b)), default=0.0) <= 1e-6
    for column in ("evidence_ids", "evidence_scores"):
        assert (column in got.columns) == (column in expected.columns)
    if "evidence_ids" in got.columns:
        assert got["evidence_ids"].to_list() == expected["evidence_ids"].to_list()


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_a_second_night_reuses_unchanged_products_and_equals_a_full_run(tagger, tmp_path, monkeypatch, fmt):
    night1, night2, expected = nights(tmp_path)
    tagger.tag_file(night1, tmp_path / f"n1.{fmt}", top_k=3, batch_size=7, progress=False)
    full = tagger.tag_file(night2, tmp_path / f"full.{fmt}", top_k=3, batch_size=7, progress=False)
    embedded = counting_embeds(tagger, monkeypatch)
    summary = tagger.tag_file(night2, tmp_path / f"n2.{fmt}", top_k=3, batch_size=7, progress=False,
                              previous=tmp_path / f"n1.{fmt}", summary_json=tmp_path / "summary.json")
    assert_same_predictions(read_prediction_products(tmp_path / f"n2.{fmt}"),
                            read_prediction_products(tmp_path / f"full.{fmt}"))
    counts = {key: summary.incremental[key] for key in expected}
    assert counts == expected and summary.incremental["used"]
    assert sum(embedded) == expected["retagged"] + expected["new"]  # only those went through the encoder
    assert summary.rows_tagged == full.rows_tagged == 39 and summary.rows_read == 39
    report = json.loads((tmp_path / "summary.json").read_text())
    assert {key: report["rows"]["incremental"][key] for key in expected} == expected
    # A third night over the same catalog reuses every product, and the output is unchanged.
    embedded.clear()
    again = tagger.tag_file(night2, tmp_path / f"n3.{fmt}", top_k=3, batch_size=7, progress=False,
                            previous=tmp_path / f"n2.{fmt}")
    assert embedded == [] and again.incremental["reused"] == 39 and again.incremental["dropped"] == 0
    assert_same_predictions(read_prediction_products(tmp_path / f"n3.{fmt}"),
                            read_prediction_products(tmp_path / f"n2.{fmt}"))


def test_previous_in_one_format_feeds_another_with_evidence_and_min_score(tagger, tmp_path, monkeypatch):
    night1, night2, expected = nights(tmp_path)
    options = {"top_k": 4, "min_score": 0.3, "batch_size": 9, "progress": False, "evidence": 2}
    tagger.tag_file(night1, tmp_path / "n1.parquet", **options)
    tagger.tag_file(night2, tmp_path / "full.jsonl", **options)
    summary = tagger.tag_file(night2, tmp_path / "n2.jsonl", previous=tmp_path / "n1.parquet", **options)
    assert {key: summary.incremental[key] for key in expected} == expected
    assert_same_predictions(read_prediction_products(tmp_path / "n2.jsonl"),
                            read_prediction_products(tmp_path / "full.jsonl"))
    # The previous file may be the output itself (the usual nightly job): read before it is replaced.
    tagger.tag_file(night2, tmp_path / "n2.jsonl", previous=tmp_path / "n2.jsonl", **options)
    assert_same_predictions(read_prediction_products(tmp_path / "n2.jsonl"),
                            read_prediction_products(tmp_path / "full.jsonl"))


def test_the_content_hash_is_of_the_normalised_text_and_stable():
    text = "acme red shirt"
    # The documented encoding: version byte, then the field (type byte, 8-byte little-endian length, UTF-8 text).
    expected = hashlib.blake2b(b"\x01T" + len(text).to_bytes(8, "little") + text.encode(), digest_size=16)
    assert content_hashes([text]) == [expected.hexdigest()] == ["a564bec97ca824d8d6d2536635d8080e"]
    # Fused bundles: the image reference is part of it (the string, not the picture behind it).
    with_image = content_hashes([text, text, text, text], ["img/1.jpg", "img/2.jpg", None, ["img/1.jpg"]])
    assert len(set(with_image)) == 4 and content_hashes([text])[0] not in with_image
    assert content_hashes([text], [b"\x89PNG..."]) != content_hashes([text], [b"\x89PNG.!."])  # inline bytes count


def test_every_prediction_file_has_the_content_hash_of_what_the_model_read(tagger, tmp_path):
    catalog = write_catalog(tmp_path / "cat.parquet", ["acme red shirt", "  acme red shirt ", "zeta cap"])
    for fmt in ("parquet", "csv", "jsonl"):
        tagger.tag_file(catalog, tmp_path / f"out.{fmt}", top_k=2, progress=False)
        products = read_prediction_products(tmp_path / f"out.{fmt}")
        assert products["content_hash"].to_list() == content_hashes(["acme red shirt", "acme red shirt", "zeta cap"])


def rewrite_parquet_metadata(path, **changes):
    table = pq.read_table(path)
    metadata = dict(table.schema.metadata)
    for key, value in changes.items():
        if value is None:
            metadata.pop(f"xmctag.{key}".encode())
        else:
            metadata[f"xmctag.{key}".encode()] = str(value).encode()
    pq.write_table(table.replace_schema_metadata(metadata), path)


@pytest.mark.parametrize("change", ["bundle", "top_k", "exclusive_groups", "old_file"])
def test_a_previous_file_from_other_settings_is_not_reused(tagger, tmp_path, monkeypatch, change):
    night1, night2, _ = nights(tmp_path)
    top_k = 2 if change == "top_k" else 3
    tagger.tag_file(night1, tmp_path / "n1.parquet", top_k=top_k, progress=False)
    if change == "bundle":
        rewrite_parquet_metadata(tmp_path / "n1.parquet", bundle_id="0123456789abcdef")
    if change == "exclusive_groups":
        rewrite_parquet_metadata(tmp_path / "n1.parquet", exclusive_groups=True)
    if change == "old_file":  # from an xmctag before content hashes
        rewrite_parquet_metadata(tmp_path / "n1.parquet", content_hash=None)
    tagger.tag_file(night2, tmp_path / "full.parquet", top_k=3, progress=False)
    embedded = counting_embeds(tagger, monkeypatch)
    with pytest.warns(UserWarning, match="--previous .*n1.parquet: not reused, "):
        summary = tagger.tag_file(night2, tmp_path / "n2.parquet", top_k=3, progress=False,
                                  previous=tmp_path / "n1.parquet")
    assert sum(embedded) == 39  # every product tagged
    assert not summary.incremental["used"] and summary.incremental["reused"] == 0
    assert summary.incremental["reason"]
    assert_same_predictions(read_prediction_products(tmp_path / "n2.parquet"),
                            read_prediction_products(tmp_path / "full.parquet"))


def test_a_csv_without_its_settings_file_or_escaped_is_not_reused(tagger, tmp_path, monkeypatch):
    night1, night2, _ = nights(tmp_path)
    tagger.tag_file(night1, tmp_path / "n1.csv", top_k=3, progress=False, escape_formulas=True)
    with pytest.warns(UserWarning, match="--escape-formulas"):
        summary = tagger.tag_file(night2, tmp_path / "n2.csv", top_k=3, progress=False, previous=tmp_path / "n1.csv")
    assert not summary.incremental["used"]
    tagger.tag_file(night1, tmp_path / "n1.csv", top_k=3, progress=False)
    (tmp_path / "n1.csv.meta.json").unlink()
    with pytest.warns(UserWarning, match="no settings file"):
        summary = tagger.tag_file(night2, tmp_path / "n2.csv", top_k=3, progress=False, previous=tmp_path / "n1.csv")
    assert not summary.incremental["used"]


def damaged(tmp_path, tagger, how: str):
    """A previous prediction file written by this tagger, then damaged ``how``."""
    night1 = write_catalog(tmp_path / "night1.parquet", TITLES[:10])
    fmt = "csv" if how.startswith("csv") else "parquet"
    path = tmp_path / f"n1.{fmt}"
    tagger.tag_file(night1, path, top_k=3, progress=False)
    if fmt == "csv":
        text = path.read_text().splitlines()
        if how == "csv_text_score":
            text[1] = ",".join(v if i != 4 else "high" for i, v in enumerate(text[1].split(",")))
        if how == "csv_repeated_rank":
            text.append(text[1])
        path.write_text("\n".join(text) + "\n")
        return path
    table = pq.read_table(path)
    frame = pl.from_arrow(table)
    if how == "garbage":
        path.write_bytes(b"PAR1 this is not parquet")
        return path
    if how == "duplicate_id":
        frame = frame.with_columns(id=pl.when(pl.col("id") == "p3").then(pl.lit("p2")).otherwise(pl.col("id")))
    if how == "scores_as_text":
        frame = frame.with_columns(scores=pl.col("scores").cast(pl.List(pl.String)))
    if how == "hash_as_list":
        frame = frame.with_columns(content_hash=pl.concat_list("content_hash"))
    if how == "unknown_label":
        frame = frame.with_columns(labels=pl.col("labels").list.eval(pl.element() + "x"))
    pq.write_table(frame.to_arrow().replace_schema_metadata(table.schema.metadata), path)
    return path


@pytest.mark.parametrize("how, message", [
    ("garbage", "not a readable Parquet file"),
    ("duplicate_id", "id 'p2' is in more than one product"),
    ("scores_as_text", "column 'scores' has type List\\(String\\); expected a list of numbers"),
    ("hash_as_list", "column 'content_hash' has type List"),
    ("unknown_label", "label '.*x' is not a label of the bundle"),
    ("csv_text_score", "column 'score' has type String; expected numbers"),
    ("csv_repeated_rank", "id 'p0' has rank 1 twice"),
])
def test_a_malformed_previous_file_is_an_error_naming_it(tagger, tmp_path, how, message):
    previous = damaged(tmp_path, tagger, how)
    catalog = write_catalog(tmp_path / "cat.parquet", TITLES[:10])
    with pytest.raises(UserError, match=f"{previous}: {message}"):
        tagger.tag_file(catalog, tmp_path / "out.parquet", top_k=3, progress=False, previous=previous)
    assert not (tmp_path / "out.parquet").exists()


def test_cli_previous_prints_the_counts_and_refuses_a_malformed_file_with_exit_2(tiny_bundle, tmp_path):
    night1, night2, expected = nights(tmp_path)
    runner = CliRunner()

    def tag(*args):
        return runner.invoke(app, ["tag", "--model", str(tiny_bundle), "--quiet", *map(str, args)],
                             catch_exceptions=False)

    assert tag(night1, "-o", tmp_path / "n1.parquet").exit_code == 0
    result = tag(night2, "-o", tmp_path / "n2.parquet", "--previous", tmp_path / "n1.parquet")
    assert result.exit_code == 0, result.output
    assert (f"--previous {tmp_path / 'n1.parquet'}: {expected['reused']} rows reused, {expected['retagged']} "
            f"re-tagged (content changed), {expected['new']} new, {expected['dropped']} dropped") in result.stderr
    (tmp_path / "bad.parquet").write_text("id,labels\n")
    result = tag(night2, "-o", tmp_path / "n3.parquet", "--previous", tmp_path / "bad.parquet")
    assert result.exit_code == 2
    assert f"{tmp_path / 'bad.parquet'}: not a Parquet file" in result.stderr
    result = tag(night2, "-o", tmp_path / "n3.parquet", "--previous", tmp_path / "missing.parquet")
    assert result.exit_code == 2 and "missing.parquet: no such file" in result.stderr
    assert not (tmp_path / "n3.parquet").exists()


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_an_empty_previous_file_makes_every_row_new(tagger, tmp_path, fmt):
    from xmctag.summary import RunChecks

    empty = write_catalog(tmp_path / "empty.parquet", [])
    tagger.tag_file(empty, tmp_path / f"n0.{fmt}", top_k=3, progress=False, checks=RunChecks(allow_empty=True))
    night1, _, _ = nights(tmp_path)
    summary = tagger.tag_file(night1, tmp_path / "n1.parquet", top_k=3, progress=False, previous=tmp_path / f"n0.{fmt}")
    assert {k: summary.incremental[k] for k in ("reused", "retagged", "new", "dropped")} == \
        {"reused": 0, "retagged": 0, "new": 40, "dropped": 0}
    tagger.tag_file(night1, tmp_path / "full.parquet", top_k=3, progress=False)
    assert_same_predictions(read_prediction_products(tmp_path / "n1.parquet"),
                            read_prediction_products(tmp_path / "full.parquet"))
