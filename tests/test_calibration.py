"""Calibrated thresholds: the fit (exact on hand-made cases), the bundle that stores them (sealed, verified, replaced
atomically), and ``tag --calibrated`` (a subset of the top-k, every kept score above its label's threshold)."""

import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

import xmctag
from xmctag import Tagger, UserError
from xmctag.bundle import Bundle
from xmctag.calibration import (
    CALIBRATION_FILE,
    fit_thresholds,
    group_threshold,
    split_rows,
)
from xmctag.cli import app
from xmctag.manifest import read_manifest, seal
from xmctag.scoring.thresholds import apply_thresholds

runner = CliRunner()


# -- the fit ----------------------------------------------------------------------------------------------------------
def test_group_threshold_is_the_lowest_score_whose_predictions_above_reach_the_target():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5], np.float32)
    correct = np.array([1, 1, 1, 1, 0], bool)
    # correct(>= s) / (predictions(>= s) + 1): 1/2, 2/3, 3/4, 4/5, 4/6
    assert group_threshold(scores, correct, 0.6) == np.float32(0.5)
    assert group_threshold(scores, correct, 0.75) == np.float32(0.6)
    assert group_threshold(scores, correct, 0.8) == np.float32(0.6)
    assert group_threshold(scores, correct, 0.81) == math.inf  # 4 of 4 correct is not enough for 0.81: 4/5
    assert group_threshold(scores[:0], correct[:0], 0.5) == math.inf
    # Ties are cut together: the first 0.5 alone would give 4/5, but both 0.5s together give 4/6 < 0.7.
    tied = np.array([0.9, 0.9, 0.9, 0.5, 0.5], np.float32)
    assert group_threshold(tied, np.array([1, 1, 1, 1, 0], bool), 0.7) == np.float32(0.9)


def hand_made():
    """Label 0 (frequent: 100 training products) and labels 1, 2 (rare: 3 and 4, band <= 5)."""
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.95, 0.92, 0.4, 0.85, 0.3, 0.2], np.float32)
    correct = np.array([1, 1, 1, 1, 0, 1, 1, 0, 1, 1, 0], bool)
    return labels, scores, correct, np.array([4, 1, 2]), np.array([100, 3, 4])


def test_fit_thresholds_per_label_then_band_then_global():
    labels, scores, correct, positives, train_counts = hand_made()
    fitted = fit_thresholds(labels, scores, correct, positives, train_counts, 0.75, min_positives=3, bands=(5, 50))
    # label 0 on its own (4 positives, 5 predictions): 3/4 at 0.7, 4/5 at 0.6, 4/6 at 0.5 -> 0.6.
    # labels 1 and 2 share band <= 5 (3 positives, 6 predictions): .95 .92 .85 .4 .3 .2 -> 3/4 at 0.85.
    assert fitted.thresholds.tolist() == [np.float32(0.6), np.float32(0.85), np.float32(0.85)]
    assert fitted.thresholds.dtype == np.float32
    assert fitted.kind.tolist() == [0, 1, 1]
    assert fitted.band_thresholds == [pytest.approx(0.85), None, None]
    assert fitted.counts() == {"per_label": 1, "band": 2, "global": 0, "never": 0}
    # No label has 5 positives and no band 5 positives: one global threshold over all 11 predictions:
    # .95 .92 .9 .85 .8 .7 .6 correct, .5 .4 wrong -> 7/9 = 0.78 at 0.5; 8/11 at 0.3 and 8/12 at 0.2 fall short.
    fitted = fit_thresholds(labels, scores, correct, positives, train_counts, 0.75, min_positives=5, bands=(5, 50))
    assert fitted.thresholds.tolist() == [np.float32(0.5)] * 3
    assert fitted.counts() == {"per_label": 0, "band": 0, "global": 3, "never": 0}
    # A target nothing reaches: never kept.
    fitted = fit_thresholds(labels, scores, correct, positives, train_counts, 0.95, min_positives=3, bands=(5, 50))
    assert np.isposinf(fitted.thresholds).all() and fitted.counts()["never"] == 3


@pytest.mark.parametrize("target", [0.6, 0.8, 0.9])
def test_kept_predictions_reach_the_target_on_what_they_were_fitted_on(target):
    # 200 labels of Zipf-like frequency, scores whose chance of being right grows with the score.
    rng = np.random.default_rng(7)
    n = 20000
    labels = np.minimum(rng.zipf(1.5, n) - 1, 199)
    scores = rng.random(n).astype(np.float32)
    correct = rng.random(n) < scores ** 0.5
    positives = np.bincount(labels[correct], minlength=200)
    train_counts = np.bincount(labels, minlength=200) * 3
    fitted = fit_thresholds(labels, scores, correct, positives, train_counts, target, min_positives=20)
    counts = fitted.counts()
    assert counts["per_label"] > 5 and counts["band"] > 5  # both kinds of group are exercised
    kept = scores >= fitted.thresholds[labels]
    assert correct[kept].mean() >= target
    for label in np.flatnonzero(fitted.kind == 0):  # every label with a threshold of its own reaches it too
        mine = kept & (labels == label)
        assert not mine.any() or correct[mine].mean() >= target
    higher = fit_thresholds(labels, scores, correct, positives, train_counts, target + 0.05, min_positives=20)
    assert (higher.thresholds >= fitted.thresholds).all()  # a higher target never lowers a threshold


def test_apply_thresholds_drops_with_minus_one():
    indices = np.array([[0, 1, 2], [2, -1, -1]])
    scores = np.array([[0.9, 0.5, 0.4], [0.3, 0.0, 0.0]], np.float32)
    thresholds = np.array([0.95, 0.5, 0.3], np.float32)
    assert apply_thresholds(indices, scores, thresholds).tolist() == [[-1, 1, 2], [2, -1, -1]]


def test_split_rows_is_a_seeded_partition():
    fit, held_out = split_rows(11, seed=3)
    assert (len(fit), len(held_out)) == (6, 5)
    assert sorted(fit.tolist() + held_out.tolist()) == list(range(11))
    assert split_rows(11, seed=3)[0].tolist() == fit.tolist() and split_rows(11, seed=4)[0].tolist() != fit.tolist()


# -- the bundle -------------------------------------------------------------------------------------------------------
def contents(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` (links resolved) with its bytes."""
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


SETTINGS = {"precision": 0.8, "top_k": 10, "min_positives": 5, "progress": False, "device": "cpu"}


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, tiny_bundle, catalog_dir):
    """A copy of the tiny bundle calibrated at precision 0.8 on the tiny dev catalog, and its report (read-only)."""
    import shutil

    copy = tmp_path_factory.mktemp("calibrated") / "tiny"
    shutil.copytree(tiny_bundle, copy)
    report = xmctag.calibrate(copy, catalog_dir / "dev.parquet", **SETTINGS)
    return copy, report


def test_calibrate_stores_thresholds_in_a_resealed_bundle(calibrated, tiny_bundle):
    path, report = calibrated
    before, after = read_manifest(tiny_bundle), read_manifest(path)  # every hash verified
    assert after["bundle_id"] != before["bundle_id"] == report.previous_bundle_id
    assert report.bundle_id == after["bundle_id"] == Bundle.open(path).bundle_id
    files = dict(after["files"])
    assert CALIBRATION_FILE in files and files.pop(CALIBRATION_FILE) is not None
    assert files == before["files"]  # every other file as it was
    section = after["calibration"]
    assert (section["file"], section["target_precision"], section["top_k"]) == (CALIBRATION_FILE, 0.8, 10)
    assert section["dev"]["file"] == "dev.parquet" and section["dev"]["rows"] == 80
    thresholds = Bundle.open(path).calibration()
    assert thresholds.dtype == np.float32 and thresholds.shape == (after["dims"]["labels"],)
    assert sum(section["counts"][k] for k in ("per_label", "band", "global")) == len(thresholds)
    # The report: the halves partition the 80 dev rows; on the fit half the promise is kept (no fallback here).
    assert report.fit["rows"] + report.held_out["rows"] == 80 and report.fit["rows"] == 40
    assert report.fit["precision"] >= 0.8
    assert section["report"]["held_out"] == report.held_out
    assert report.baseline["k"] == 5 and report.baseline["labels_per_product"] == 5.0
    assert report.held_out["labels_per_product"] < 5.0  # two true labels per product: top-5 is at most 40 % right


def test_recalibrating_replaces_the_calibration(calibrated, copy_of, catalog_dir):
    path = copy_of(calibrated[0])
    first = Bundle.open(path).calibration()
    report = xmctag.calibrate(path, catalog_dir / "dev.parquet", **{**SETTINGS, "precision": 0.95})
    manifest = read_manifest(path)
    assert manifest["calibration"]["target_precision"] == 0.95 and report.bundle_id == manifest["bundle_id"]
    assert report.previous_bundle_id == calibrated[1].bundle_id
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny"]  # no staging directory, backup or lock left
    second = Bundle.open(path).calibration()
    assert (second >= first).all()  # same split, same groups, a higher target


def test_calibrate_out_leaves_the_source_alone(tiny_bundle, tmp_path, catalog_dir):
    before = contents(tiny_bundle)
    report = xmctag.calibrate(tiny_bundle, catalog_dir / "dev.parquet", out=tmp_path / "calibrated", **SETTINGS)
    assert contents(tiny_bundle) == before
    assert Bundle.open(tmp_path / "calibrated").calibration() is not None
    assert report.bundle == str(tmp_path / "calibrated")
    with pytest.raises(UserError, match="not an empty directory"):
        xmctag.calibrate(tiny_bundle, catalog_dir / "dev.parquet", out=tmp_path / "calibrated", **SETTINGS)


def test_tampered_or_mismatched_calibration_is_refused(calibrated, copy_of):
    path = copy_of(calibrated[0])
    n_labels = read_manifest(path)["dims"]["labels"]
    np.save(path / CALIBRATION_FILE, np.zeros(n_labels, np.float32))  # edited after calibration
    with pytest.raises(UserError, match=f"{CALIBRATION_FILE} does not match the manifest"):
        Bundle.open(path)
    with pytest.raises(UserError, match=f"{CALIBRATION_FILE} does not match the manifest"):
        Tagger.load(path, device="cpu", verify=False, calibrated=True)  # its hash is checked all the same
    # Resealed (a consistent bundle) but the wrong shape, type or values: refused when read.
    manifest = read_manifest(path, verify_hashes=False)
    for bad in (np.zeros(n_labels + 1, np.float32), np.zeros(n_labels, np.float64),
                np.full(n_labels, 1.5, np.float32), np.full(n_labels, np.nan, np.float32)):
        np.save(path / CALIBRATION_FILE, bad)
        seal(path, manifest)
        with pytest.raises(UserError, match=f"{CALIBRATION_FILE} .*does not match the manifest"):
            Tagger.load(path, device="cpu", calibrated=True)
    np.save(path / CALIBRATION_FILE, np.array([{"a": 1}] * n_labels, dtype=object), allow_pickle=True)
    seal(path, manifest)
    with pytest.raises(UserError, match=f"bundle file {CALIBRATION_FILE} is unreadable"):
        Bundle.open(path).calibration()  # a pickle is never loaded
    # The manifest's section is checked like the rest of it: a path outside the bundle, or a file it does not list.
    for name, message in (("../calibration.npy", "not a relative path inside the bundle"),
                          ("other.npy", "which is not in the manifest's files")):
        seal(path, {**manifest, "calibration": {**manifest["calibration"], "file": name}})
        with pytest.raises(UserError, match=message):
            Bundle.open(path)
    seal(path, {**manifest, "calibration": {**manifest["calibration"], "target_precision": 1.5}})
    with pytest.raises(UserError, match="invalid key 'calibration.target_precision'"):
        Bundle.open(path)


def test_a_failed_calibrate_leaves_the_bundle_byte_identical(calibrated, copy_of, catalog_dir, tmp_path,
                                                              monkeypatch):
    path = copy_of(calibrated[0])
    no_labels = tmp_path / "no_labels.parquet"
    pl.read_parquet(catalog_dir / "dev.parquet").drop("labels").write_parquet(no_labels)
    before, listing = contents(path), sorted(p.name for p in path.parent.iterdir())
    with pytest.raises(UserError, match="missing column.*labels"):
        xmctag.calibrate(path, no_labels, **SETTINGS)
    with pytest.raises(UserError, match="--precision must be between 0 and 1"):
        xmctag.calibrate(path, catalog_dir / "dev.parquet", **{**SETTINGS, "precision": 1.0})
    # Interrupted while the new bundle is being sealed (its files already linked beside the old one).
    from xmctag import bundle_update

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bundle_update, "seal", interrupted)
    with pytest.raises(KeyboardInterrupt):
        xmctag.calibrate(path, catalog_dir / "dev.parquet", **SETTINGS)
    assert contents(path) == before
    assert sorted(p.name for p in path.parent.iterdir()) == listing  # no staging directory or lock left
    read_manifest(path)


def test_an_update_waits_for_no_one_and_refuses_a_bundle_that_changed(calibrated, copy_of):
    from xmctag.bundle_update import update_bundle
    from xmctag.errors import OutputLocked
    from xmctag.io.atomic import OutputLock

    path = copy_of(calibrated[0])
    before = contents(path)
    with pytest.raises(UserError, match="the bundle changed while calibrate ran"):
        update_bundle(path, {}, {}, what="calibrate", expected_id="0" * 16)
    with OutputLock(path.resolve(), "calibrate"), pytest.raises(OutputLocked, match="another xmctag run"):
        update_bundle(path, {}, {}, what="calibrate")
    assert contents(path) == before
    # Nothing to change but the seal: the same bundle, the same id, the files rebuilt as links of the old ones.
    assert update_bundle(path, {}, {})["bundle_id"] == read_manifest(path)["bundle_id"] == calibrated[1].bundle_id
    assert contents(path) == before


# -- tagging with the thresholds --------------------------------------------------------------------------------------
def test_tag_calibrated_keeps_a_subset_above_the_thresholds(calibrated, catalog_dir, tmp_path):
    path, _ = calibrated
    dev = catalog_dir / "dev.parquet"
    plain = Tagger.load(path, device="cpu")
    tagger = Tagger.load(path, device="cpu", calibrated=True)
    thresholds = Bundle.open(path).calibration()
    full = plain.tag_file(dev, tmp_path / "plain.parquet", top_k=5, progress=False)
    summary = tagger.tag_file(dev, tmp_path / "calibrated.parquet", top_k=5, progress=False)
    before = pl.read_parquet(tmp_path / "plain.parquet")
    after = pl.read_parquet(tmp_path / "calibrated.parquet")
    assert after["id"].to_list() == before["id"].to_list()
    index = {label: i for i, label in enumerate(tagger.label_ids.tolist())}
    for (labels, scores), (all_labels, all_scores) in zip(after.select("labels", "scores").iter_rows(),
                                                          before.select("labels", "scores").iter_rows()):
        kept = [(label, score) for label, score in zip(all_labels, all_scores) if score >= thresholds[index[label]]]
        assert list(zip(labels, scores)) == kept  # the uncalibrated ranking, less what scores below its threshold
    lengths = after["labels"].list.len()
    assert lengths.sum() < before["labels"].list.len().sum() == 5 * 80
    assert summary.fewer_than_k == int((lengths < 5).sum()) > 0 and full.fewer_than_k == 0
    assert summary.without_labels == int((lengths == 0).sum())
    assert summary.to_dict()["rows"]["fewer_than_k"] == summary.fewer_than_k
    import pyarrow.parquet as pq

    assert pq.read_schema(tmp_path / "calibrated.parquet").metadata[b"xmctag.calibrated_precision"] == b"0.8"


def test_calibrated_with_min_score_and_exclusive_groups(calibrated):
    path, _ = calibrated
    texts = ["acme red shirt", "nova blue jeans", "zeta green watch", "orbit black bag", "lumen pink cap"]
    thresholds = Bundle.open(path).calibration()
    indices, scores = Tagger.load(path, device="cpu").predict(texts, top_k=8, min_score=0.2)
    both, both_scores = Tagger.load(path, device="cpu", calibrated=True).predict(texts, top_k=8, min_score=0.2)
    assert np.array_equal(both_scores, scores)
    assert np.array_equal(both, np.where(scores >= thresholds[np.maximum(indices, 0)], indices, -1))
    grouped = Tagger.load(path, device="cpu", calibrated=True, exclusive_groups=True)
    top, top_scores = grouped.predict(texts, top_k=8)
    kept = top >= 0
    assert (top_scores[kept] >= thresholds[top[kept]]).all()
    for row in top:  # still at most one label per exclusive facet
        facets = [grouped.groups[i] for i in row if i >= 0 and grouped.groups[i] >= 0]
        assert len(facets) == len(set(facets))


def test_calibrated_without_calibration_names_the_command(bundle):
    with pytest.raises(UserError, match="has no calibration; run `xmctag calibrate"):
        Tagger.load(bundle, device="cpu", calibrated=True)


# -- the command line -------------------------------------------------------------------------------------------------
def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_cli_calibrate_and_tag_calibrated(calibrated, copy_of, catalog_dir, tmp_path):
    path = copy_of(calibrated[0])
    dev = catalog_dir / "dev.parquet"
    result = invoke("calibrate", path, "--dev", dev, "--precision", 0.8, "--top-k", 10, "--min-positives", 5,
                    "--device", "cpu", "--json", "-q")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["target_precision"] == 0.8 and report["bundle_id"] == read_manifest(path)["bundle_id"]
    assert report["held_out"] == calibrated[1].held_out  # same dev, seed and settings: the same thresholds
    result = invoke("calibrate", path, "--dev", dev, "--precision", 0.8, "--top-k", 10, "--min-positives", 5,
                    "--device", "cpu", "-q")
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.replace("│", " ").split())
    assert "promised precision 0.8, measured" in text and "held-out, top-5 40 40.00" in text
    result = invoke("tag", dev, "--model", path, "--calibrated", "-o", tmp_path / "out.parquet", "-q")
    assert result.exit_code == 0, result.output
    lengths = pl.read_parquet(tmp_path / "out.parquet")["labels"].list.len()
    assert (f"calibrated thresholds (precision 0.8): {int((lengths < 5).sum())} of 80 products got fewer than 5 "
            f"labels, {int((lengths == 0).sum())} none") in " ".join(result.stderr.split())


def test_cli_errors_are_one_line(bundle, catalog_dir, tmp_path):
    result = invoke("tag", catalog_dir / "dev.parquet", "--model", bundle, "--calibrated", "-o",
                    tmp_path / "out.parquet")
    assert result.exit_code == 2 and "run `xmctag calibrate" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "out.parquet").exists()
    result = invoke("calibrate", bundle, "--dev", catalog_dir / "dev.parquet", "--precision", 2)
    assert result.exit_code == 2 and "--precision must be between 0 and 1" in result.stderr
    result = invoke("calibrate", bundle, "--dev", tmp_path / "missing.parquet", "--out", tmp_path / "x")
    assert result.exit_code == 2 and "missing.parquet: no such file" in result.stderr


def test_previous_predictions_are_reused_only_with_the_same_calibration_setting(calibrated, catalog_dir, tmp_path):
    """``tag --previous`` compares ``calibrated_precision`` like any setting: a plain file is not reused by a
    calibrated run of the same bundle, a calibrated one is, and the reused output equals a fresh calibrated run."""
    path, _ = calibrated
    dev = catalog_dir / "dev.parquet"
    plain = Tagger.load(path, device="cpu")
    tagger = Tagger.load(path, device="cpu", calibrated=True)
    plain.tag_file(dev, tmp_path / "plain.parquet", top_k=5, progress=False)
    tagger.tag_file(dev, tmp_path / "calibrated.parquet", top_k=5, progress=False)
    with pytest.warns(UserWarning, match="not reused"):
        other = tagger.tag_file(dev, tmp_path / "from-plain.parquet", top_k=5, progress=False,
                                previous=tmp_path / "plain.parquet")
    assert other.incremental["reused"] == 0
    same = tagger.tag_file(dev, tmp_path / "again.parquet", top_k=5, progress=False,
                           previous=tmp_path / "calibrated.parquet")
    assert same.incremental["reused"] == 80
    columns = ["id", "labels", "content_hash"]
    assert pl.read_parquet(tmp_path / "again.parquet", columns=columns).equals(
        pl.read_parquet(tmp_path / "calibrated.parquet", columns=columns))
    assert pl.read_parquet(tmp_path / "from-plain.parquet", columns=columns).equals(
        pl.read_parquet(tmp_path / "calibrated.parquet", columns=columns))


def test_relabel_drops_the_calibration_and_says_so(calibrated, tmp_path):
    """Thresholds are per label and fitted on the old ranking: a relabelled bundle has none (and tells the user to
    recalibrate), loads and verifies, and ``--calibrated`` on it names the command to run."""
    path, _ = calibrated
    labels = Bundle.open(path).labels(["label", "text"])
    labels.filter(pl.col("label") != labels["label"][0]).write_parquet(tmp_path / "labels.parquet")
    report = xmctag.relabel(path, tmp_path / "labels.parquet", tmp_path / "new", progress=False)
    assert report.calibration_dropped and "xmctag calibrate" in report.line()
    new = Bundle.open(tmp_path / "new")
    assert "calibration" not in new.manifest and new.calibration() is None
    assert not any(name.startswith("calibration") for name in new.manifest["files"])
    with pytest.raises(UserError, match="xmctag calibrate"):
        Tagger.load(tmp_path / "new", device="cpu", calibrated=True)
