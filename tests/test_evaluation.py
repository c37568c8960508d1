"""evaluation/: eval of prediction files: bad inputs, duplicates, notes and refusals, and where the PSP propensities
come from."""

import json
import shutil
import warnings

import polars as pl
import pytest
from conftest import write_catalog

from xmctag import Tagger, UserError
from xmctag.manifest import seal

TITLES = ["acme red shirt", "zeta blue jeans with a much longer title than the others, and more words", "cap",
          "nova white watch", "orbit pink dress", "lumen grey belt", "acme black socks and a yellow bag"]


# -- eval: bad inputs and where the PSP propensities come from ------------------------------------------------------
@pytest.fixture(scope="module")
def dev_predictions(loaded, catalog_dir, tmp_path_factory):
    """Predictions for the dev products with the colour left out of their titles (so that the model has to guess
    it and PSP@k depends on the propensities), in every format; ``truth.parquet`` is their truth. Read-only."""
    tagger = loaded
    out = tmp_path_factory.mktemp("preds")
    dev = pl.read_parquet(catalog_dir / "dev.parquet")
    dev.with_columns(pl.col("title").str.replace(r" \w+ ", " ")).write_parquet(out / "truth.parquet")
    for fmt in ("parquet", "jsonl", "csv"):
        tagger.tag_file(out / "truth.parquet", out / f"p.{fmt}", top_k=5, progress=False)
    return out


def test_eval_inputs_of_the_wrong_shape_are_clear_errors(dev_predictions, catalog_dir, tmp_path):
    from xmctag.evaluation.predictions import evaluate_predictions

    preds, truth = dev_predictions / "p.parquet", dev_predictions / "truth.parquet"
    dev = pl.read_parquet(truth)
    dev.with_columns(pl.col("labels").list.join(",")).write_csv(tmp_path / "truth.csv")
    dev.with_columns(pl.col("labels").list.join(",")).write_parquet(tmp_path / "truth-str.parquet")
    list_type = r"expected a list of label ids \(list\[str\] or list\[int\]\)"
    with pytest.raises(UserError, match=rf"truth.csv: column 'labels' has type String; {list_type} \(CSV cannot"):
        evaluate_predictions(preds, tmp_path / "truth.csv")
    with pytest.raises(UserError, match=rf"truth-str.parquet: column 'labels' has type String; {list_type}"):
        evaluate_predictions(preds, tmp_path / "truth-str.parquet")
    with pytest.raises(UserError, match=rf"truth.csv: column 'labels' has type String; {list_type}"):
        evaluate_predictions(preds, truth, train=tmp_path / "truth.csv")
    # prediction files missing a column, or with one of the wrong type
    pl.read_parquet(preds).drop("labels").write_parquet(tmp_path / "nolabels.parquet")
    with pytest.raises(UserError, match=r"nolabels.parquet: missing column\(s\) labels"):
        evaluate_predictions(tmp_path / "nolabels.parquet", truth)
    pl.read_parquet(preds).with_columns(pl.col("labels").list.join(",")).write_parquet(tmp_path / "strlab.parquet")
    with pytest.raises(UserError, match=rf"strlab.parquet: column 'labels' has type String; {list_type}"):
        evaluate_predictions(tmp_path / "strlab.parquet", truth)
    pl.read_csv(dev_predictions / "p.csv").drop("id").write_csv(tmp_path / "noid.csv")
    with pytest.raises(UserError, match=r"noid.csv: missing column\(s\) id"):
        evaluate_predictions(tmp_path / "noid.csv", truth)
    pl.read_csv(dev_predictions / "p.csv").with_columns(pl.col("rank").cast(pl.String) + "st") \
        .write_csv(tmp_path / "rank.csv")
    with pytest.raises(UserError, match="rank.csv: column 'rank' has type String; expected integers"):
        evaluate_predictions(tmp_path / "rank.csv", truth)
    (tmp_path / "listid.jsonl").write_text('{"id": ["a"], "rank": 1, "label": "x"}\n')
    with pytest.raises(UserError, match="listid.jsonl: column 'id' has type List"):
        evaluate_predictions(tmp_path / "listid.jsonl", truth)
    (tmp_path / "p.parquet").write_text("id,labels\na,b\n")
    with pytest.raises(UserError, match="p.parquet: not a Parquet file"):
        evaluate_predictions(tmp_path / "p.parquet", truth)


def test_every_prediction_format_gets_the_same_psp_propensities(dev_predictions, catalog_dir, bundle, tmp_path):
    from xmctag.evaluation.predictions import TRUTH_COUNTS, evaluate_predictions

    truth = dev_predictions / "truth.parquet"
    reports = {fmt: evaluate_predictions(dev_predictions / f"p.{fmt}", truth) for fmt in ("parquet", "jsonl", "csv")}
    for report in reports.values():
        assert report.propensity_source == f"training counts of bundle {bundle.resolve()}"
        assert report.metrics == reports["parquet"].metrics  # identical, PSP included
    assert reports["parquet"].metrics["P@5"] < 0.4 and reports["parquet"].metrics["PSP@5"] < 0.95  # guessed colours
    by_truth = evaluate_predictions(dev_predictions / "p.parquet", truth, train=truth)
    assert by_truth.metrics["PSP@1"] != reports["parquet"].metrics["PSP@1"]  # the counts do matter here
    by_train = evaluate_predictions(dev_predictions / "p.jsonl", truth, train=catalog_dir / "train.parquet")
    assert by_train.metrics == pytest.approx(reports["parquet"].metrics)  # the bundle's counts are training's
    # A file that names no bundle (hand-made, or from before the bundle column): the truth's counts, no warning
    pl.read_ndjson(dev_predictions / "p.jsonl").select("id", "rank", "label").write_ndjson(tmp_path / "bare.jsonl")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bare = evaluate_predictions(tmp_path / "bare.jsonl", truth)
    assert bare.propensity_source == TRUTH_COUNTS and bare.metrics == by_truth.metrics


def test_a_re_exported_bundle_at_the_stored_path_is_not_used_for_propensities(bundle, dev_predictions, copy_of,
                                                                               tmp_path):
    # The predictions record the bundle's directory and id; here the directory later holds another bundle.
    from xmctag.evaluation.predictions import TRUTH_COUNTS, evaluate_predictions

    moved = copy_of(bundle)
    made_by = Tagger.load(moved, device="cpu")
    for fmt in ("parquet", "jsonl"):
        made_by.tag_file(dev_predictions / "truth.parquet", tmp_path / f"p.{fmt}", top_k=5, progress=False)
    truth = dev_predictions / "truth.parquet"
    fresh = [evaluate_predictions(tmp_path / f"p.{fmt}", truth) for fmt in ("parquet", "jsonl")]
    assert all(r.propensity_source.startswith("training counts of bundle") for r in fresh)
    # Re-exported in place: a new bundle id at the same path (its counts could be anything now). Here: another
    # scale, sealed as export would (an edited bundle_id alone is a modified manifest, refused below).
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["scoring"]["scale"] *= 2
    new_id = seal(moved, manifest)["bundle_id"]
    for fmt in ("parquet", "jsonl"):
        with pytest.warns(UserWarning, match=rf"p.{fmt}: the bundle at .* is now bundle {new_id}, not "
                                             rf"{made_by.bundle_id} .*truth file's label counts instead"):
            report = evaluate_predictions(tmp_path / f"p.{fmt}", truth)
        assert report.propensity_source == TRUTH_COUNTS
        assert report.metrics == evaluate_predictions(tmp_path / f"p.{fmt}", truth, train=truth).metrics
        assert report.metrics["PSP@1"] != fresh[0].metrics["PSP@1"]
    (moved / "manifest.json").write_text(json.dumps({**manifest, "bundle_id": made_by.bundle_id}))
    with pytest.warns(UserWarning, match="no readable bundle at .*the manifest was modified after export"):
        assert evaluate_predictions(tmp_path / "p.jsonl", truth).propensity_source == TRUTH_COUNTS
    shutil.rmtree(moved)
    with pytest.warns(UserWarning, match="no readable bundle at"):
        report = evaluate_predictions(tmp_path / "p.jsonl", truth)
    assert report.propensity_source == TRUTH_COUNTS


def test_duplicate_ids_are_tagged_and_refused_by_eval(tagger, tmp_path):
    from xmctag.evaluation.predictions import evaluate_predictions

    ids = ["a", "b", "a", "c", "b", "a", "d"]
    catalog = write_catalog(tmp_path / "cat.parquet", TITLES, ids=ids)
    pl.DataFrame({"id": ["a", "b", "c", "d"], "labels": [["colour:red"]] * 4}).write_parquet(tmp_path / "t.parquet")
    for fmt, message in (("parquet", r"id 'a' is in more than one row \(5 rows share an id\)"),
                         ("csv", r"id 'a' has rank 1 twice"), ("jsonl", r"id 'a' has rank 1 twice")):
        summary = tagger.tag_file(catalog, tmp_path / f"p.{fmt}", top_k=2, batch_size=3, progress=False)
        assert summary.rows_tagged == 7  # every row tagged: ids are the catalog's business
        with pytest.raises(UserError, match=rf"p.{fmt}: {message}.*one prediction list per product"):
            evaluate_predictions(tmp_path / f"p.{fmt}", tmp_path / "t.parquet")
    assert pl.read_parquet(tmp_path / "p.parquet")["id"].to_list() == ids


def test_eval_notes_and_refusals(dev_predictions, tmp_path):
    from xmctag.evaluation.predictions import evaluate_predictions

    preds, truth = dev_predictions / "p.csv", dev_predictions / "truth.parquet"
    dev = pl.read_parquet(truth)
    dev.with_columns(pl.when(pl.int_range(pl.len()) < 3).then(pl.lit([], pl.List(pl.String)))
                     .otherwise(pl.col("labels")).alias("labels")).write_parquet(tmp_path / "truth.parquet")
    report = evaluate_predictions(preds, tmp_path / "truth.parquet", ks=(1, 5, 100))
    assert report.truth_rows_without_labels == 3
    assert report.notes == ["3 truth rows have no labels (scored 0)",
                            "k=100 exceeds the 5 labels predicted per product; P@100 counts the missing ones as wrong"]
    assert report.metrics["P@100"] == pytest.approx(report.metrics["P@5"] * 5 / 100)
    assert evaluate_predictions(preds, truth).notes == []
    dev.with_columns(("other-" + pl.col("id")).alias("id")).write_parquet(tmp_path / "other.parquet")
    with pytest.raises(UserError, match=r"p.csv: no predicted id is in the truth file .*other.parquet .*wrong file\?"):
        evaluate_predictions(preds, tmp_path / "other.parquet")
    with pytest.raises(UserError, match="--k needs cut-offs >= 1"):
        evaluate_predictions(preds, truth, ks=(0, 1))
    with pytest.raises(UserError, match="is a directory, not a prediction file"):
        evaluate_predictions(tmp_path, truth)
