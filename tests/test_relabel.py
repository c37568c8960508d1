"""``xmctag relabel``: a bundle for a new label table without retraining (kept labels unchanged, new labels from
their text, retired labels gone everywhere), and ``tag --labels``'s warning."""

import json
import os

import numpy as np
import polars as pl
import pytest
from conftest import make_catalog, make_labels
from typer.testing import CliRunner

import xmctag
from xmctag import Tagger
from xmctag.bundle import Bundle
from xmctag.cli import app
from xmctag.manifest import read_manifest
from xmctag.relabeller import embed_label_texts
from xmctag.scoring import NeighbourLabels
from xmctag.scoring.new_labels import calibrate_threshold, fit_vector_map, pseudo_labels

runner = CliRunner()
NEW = pl.DataFrame({"label": ["colour:purple", "article:scarf"], "text": ["colour: purple", "article: scarf"],
                    "alt_texts": [["colour purple tone"], []]})


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def texts() -> list[str]:
    return make_catalog(60, seed=5)["title"].to_list()


def full_ranking(tagger: Tagger, titles: list[str]) -> list[dict[str, float]]:
    """Every label's score for each title (top-k = every label: rank_labels scores all 20 or so as candidates)."""
    top, scores = tagger.predict(titles, top_k=len(tagger.label_ids))
    return [{tagger.label_ids[i]: float(s) for i, s in zip(row, row_scores) if i >= 0}
            for row, row_scores in zip(top, scores)]


def table(tmp_path, frame: pl.DataFrame, name: str = "labels-new.parquet"):
    frame.write_parquet(tmp_path / name)
    return tmp_path / name


def test_the_same_table_reproduces_the_bundle(tiny_bundle, tagger, catalog_dir, tmp_path):
    report = xmctag.relabel(tiny_bundle, catalog_dir / "labels.parquet", tmp_path / "same", progress=False)
    assert (report.kept, report.added, report.retired, report.text_changed) == (19, 0, 0, 0)
    again = Tagger.load(tmp_path / "same", device="cpu")
    for new, old in zip(again.predict(texts(), top_k=5), tagger.predict(texts(), top_k=5)):
        np.testing.assert_array_equal(new, old)  # indices and scores, exactly
    for name in ("label_vectors.npy", "label_embeddings.npy", "neighbours.faiss", "train_labels.npz"):
        assert (tmp_path / "same" / name).read_bytes() == (tiny_bundle / name).read_bytes(), name
    assert not (tmp_path / "same" / "labels.faiss").exists()  # exact: label_vectors.npy is searched directly
    assert not (tmp_path / "same/lexical/label_map.npy").exists()  # nothing to map
    manifest = read_manifest(tmp_path / "same")
    assert manifest["relabel"]["source_bundle_id"] == tagger.bundle_id == report.source_bundle_id


def test_new_labels_get_mapped_vectors_and_kept_labels_keep_theirs(tiny_bundle, tagger, catalog_dir, tmp_path):
    labels = table(tmp_path, pl.concat([make_labels(), NEW]))
    report = xmctag.relabel(tiny_bundle, labels, tmp_path / "more", refit=False, progress=False)
    assert (report.kept, report.added, report.retired) == (19, 2, 0) and report.vectors["method"] == "ridge"
    source, out = Bundle.open(tiny_bundle), Bundle.open(tmp_path / "more")
    old_vectors, new_vectors = np.asarray(source.label_vectors()), np.asarray(out.label_vectors())
    np.testing.assert_array_equal(new_vectors[:19], old_vectors)  # the kept rows, bit for bit
    np.testing.assert_array_equal(out.label_embeddings()[:19], source.label_embeddings())
    # The new rows: the ridge map fitted on the trained labels, applied to the ONNX embeddings of the new texts.
    old = source.labels(["train_count"])
    embedded = embed_label_texts(source, ["colour: purple ; colour purple tone", "article: scarf"])
    mapped = fit_vector_map(source.label_embeddings(), old_vectors, old["train_count"].to_numpy()).apply(embedded)
    np.testing.assert_array_equal(new_vectors[19:], mapped)
    np.testing.assert_array_equal(out.label_embeddings()[19:], embedded)
    frame = out.labels(["label", "encoder_text", "train_count"])
    assert frame["label"].to_list()[19:] == ["colour:purple", "article:scarf"]
    assert frame["train_count"].to_list()[19:] == [0, 0]
    # Kept labels score as before; new labels are scored, with neighbour votes, and fused by the dense score alone.
    grown = Tagger.load(tmp_path / "more", device="cpu")
    for new, old_scores in zip(full_ranking(grown, texts()), full_ranking(tagger, texts())):
        assert {k: v for k, v in new.items() if k in old_scores} == old_scores
        assert {"colour:purple", "article:scarf"} <= set(new)
    votes = NeighbourLabels.load(tmp_path / "more/train_labels.npz")
    assert report.votes["pairs"] == int((votes.indices >= 19).sum()) > 0
    assert grown.lexical_weights[19:].tolist() == [0.0, 0.0] and (grown.lexical_weights[:19] > 0).any()


def test_label_side_embeddings_match_training(tiny_bundle):
    # The ONNX path relabel embeds new labels with reads label texts as training did (synonyms, label_max_length).
    source = Bundle.open(tiny_bundle)
    encoder_texts = source.labels(["encoder_text"], optional=())["encoder_text"].to_list()
    np.testing.assert_allclose(embed_label_texts(source, encoder_texts), source.label_embeddings(), atol=1e-4)


def test_retired_labels_disappear_everywhere(tiny_bundle, tagger, tmp_path):
    retired = {"colour:red", "article:shirt"}
    labels = table(tmp_path, make_labels().filter(~pl.col("label").is_in(list(retired))))
    report = xmctag.relabel(tiny_bundle, labels, tmp_path / "fewer", progress=False)
    assert (report.kept, report.added, report.retired) == (17, 0, 2)
    fewer = Tagger.load(tmp_path / "fewer", device="cpu")
    assert not retired & set(fewer.label_ids.tolist())
    titles = texts() + ["acme red shirt"] * 3
    # The remaining labels' order and scores: the original's without the retired labels, for every product (faiss
    # computes the label vectors' float32 inner products over a smaller matrix now: they may round 1e-7 apart).
    for new, old in zip(full_ranking(fewer, titles), full_ranking(tagger, titles)):
        kept = {k: v for k, v in old.items() if k not in retired}
        assert list(new) == list(kept)
        np.testing.assert_allclose(list(new.values()), list(kept.values()), rtol=0, atol=1e-6)
    # The lexical model never returns them (its trees still hold them: the label map drops them).
    top, scores = fewer.lexical.predict(titles)
    original, _ = tagger.lexical.predict(titles)
    named = [[fewer.label_ids[i] for i in row if i >= 0] for row in top]
    assert named == [[tagger.label_ids[i] for i in row if i >= 0 and tagger.label_ids[i] not in retired]
                     for row in original]
    assert (scores[top < 0] == 0).all() and (top < 0).any()
    # Each training product's labels (its neighbour votes): the original's without the retired ones.
    votes, before = (NeighbourLabels.load(path / "train_labels.npz") for path in (tmp_path / "fewer", tiny_bundle))
    assert votes.problem(len(before), 17) is None
    assert [[fewer.label_ids[i] for i in votes.indices[a:b]] for a, b in zip(votes.indptr, votes.indptr[1:])] == \
        [[tagger.label_ids[i] for i in before.indices[a:b] if tagger.label_ids[i] not in retired]
         for a, b in zip(before.indptr, before.indptr[1:])]
    assert Bundle.open(tmp_path / "fewer").label_index().ntotal == 17


def test_relabels_compose_and_the_manifest_records_them(tiny_bundle, tmp_path):
    first = table(tmp_path, make_labels().filter(pl.col("label") != "colour:red"), "first.parquet")
    second = table(tmp_path, pl.concat([make_labels().filter(~pl.col("label").is_in(["colour:red", "article:cap"])),
                                        NEW]).reverse(), "second.parquet")
    xmctag.relabel(tiny_bundle, first, tmp_path / "one", progress=False)
    report = xmctag.relabel(tmp_path / "one", second, tmp_path / "two", progress=False)
    direct = xmctag.relabel(tiny_bundle, second, tmp_path / "direct", progress=False)
    assert (report.kept, report.added, report.retired) == (17, 2, 1)
    assert (direct.kept, direct.added, direct.retired) == (17, 2, 2)
    two, straight = Tagger.load(tmp_path / "two", device="cpu"), Tagger.load(tmp_path / "direct", device="cpu")
    assert two.label_ids.tolist() == straight.label_ids.tolist() == pl.read_parquet(second)["label"].to_list()
    for a, b in zip(two.lexical.predict(texts()), straight.lexical.predict(texts())):
        np.testing.assert_array_equal(a, b)  # the label maps compose
    manifest = read_manifest(tmp_path / "two")  # verifies every hash and the bundle id
    one = json.loads((tmp_path / "one/manifest.json").read_text())
    assert manifest["relabel"]["source_bundle_id"] == one["bundle_id"] != manifest["bundle_id"]
    assert {k: manifest["relabel"][k] for k in ("kept", "added", "retired")} == {"kept": 17, "added": 2,
                                                                                 "retired": 1}
    assert manifest["dims"]["labels"] == 19 and manifest["relabel"]["votes"]["pairs"] > 0
    # The model card keeps the training figures and says, once per relabel, that the table changed since.
    card = (tmp_path / "two/README.md").read_text()
    assert card.startswith((tiny_bundle / "README.md").read_text().rstrip())
    assert card.count("## Label table changed after training") == 2
    assert f"source bundle `{one['bundle_id']}`): 17 labels kept with their trained vectors, 2 added" in card


def test_a_changed_text_keeps_the_trained_vector(tiny_bundle, tmp_path):
    labels = table(tmp_path, make_labels().with_columns(
        pl.when(pl.col("label") == "colour:red").then(pl.lit("colour: crimson")).otherwise(pl.col("text"))
        .alias("text")))
    report = xmctag.relabel(tiny_bundle, labels, tmp_path / "renamed", progress=False)
    assert (report.kept, report.added, report.text_changed) == (19, 0, 1)
    out = Bundle.open(tmp_path / "renamed")
    np.testing.assert_array_equal(out.label_vectors(), Bundle.open(tiny_bundle).label_vectors())
    frame = out.labels(["label", "text", "encoder_text"]).filter(pl.col("label") == "colour:red")
    assert frame.row(0) == ("colour:red", "colour: crimson", "colour: red ; colour red tone")


def test_relabel_cli_then_tag_round_trip(tiny_bundle, catalog_dir, tmp_path):
    labels = table(tmp_path, pl.concat([make_labels().filter(pl.col("label") != "colour:red"), NEW]))
    result = invoke("relabel", tiny_bundle, labels, "--out", tmp_path / "new", "--quiet")
    assert result.exit_code == 0, result.output
    assert "18 labels kept, 2 added (ridge vectors" in " ".join(result.stderr.split())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels-new.parquet", "new"]  # no staging left
    result = invoke("tag", catalog_dir / "dev.parquet", "--model", tmp_path / "new", "--top-k", 20, "--output",
                    tmp_path / "preds.parquet", "--quiet")
    assert result.exit_code == 0, result.output
    preds = pl.read_parquet(tmp_path / "preds.parquet")
    seen = set(preds["labels"].explode().to_list())
    assert "colour:red" not in seen and {"colour:purple", "article:scarf"} <= seen
    expected = Tagger.load(tmp_path / "new", device="cpu").tag(pl.read_parquet(catalog_dir / "dev.parquet"), 20)
    assert preds["labels"].to_list() == expected["labels"].to_list()
    # --out holding a bundle: refused without --overwrite, replaced with it; never the source bundle.
    result = invoke("relabel", tiny_bundle, labels, "--out", tmp_path / "new", "--quiet")
    assert result.exit_code == 2 and "use --overwrite" in result.stderr
    result = invoke("relabel", tiny_bundle, labels, "--out", tmp_path / "new", "--vectors", "scaled",
                    "--overwrite", "--quiet")
    assert result.exit_code == 0 and read_manifest(tmp_path / "new")["relabel"]["vectors"]["method"] == "scaled"
    result = invoke("relabel", tmp_path / "new", labels, "--out", tmp_path / "new", "--overwrite", "--quiet")
    assert result.exit_code == 2 and "holds the bundle" in result.stderr


@pytest.mark.parametrize("problem, expected", [
    ("duplicate", "duplicate label id(s) in column label: colour:red"),
    ("empty text", "row 19 (label 'colour:purple'): empty text in column 'text'"),
    ("one label", "the label table has 1 label(s)"),
    ("no text column", "missing column(s) text"),
])
def test_bad_tables_are_one_line_errors(tiny_bundle, tmp_path, problem, expected):
    frame = pl.concat([make_labels(), NEW])
    if problem == "duplicate":
        frame = pl.concat([frame, frame.head(1)])
    elif problem == "empty text":
        frame = pl.concat([make_labels(), NEW.with_columns(text=pl.Series([" ", "article: scarf"]),
                                                           alt_texts=pl.Series([[], []], dtype=pl.List(pl.String)))])
    elif problem == "one label":
        frame = frame.head(1)
    else:
        frame = frame.drop("text")
    result = invoke("relabel", tiny_bundle, table(tmp_path, frame), "--out", tmp_path / "out", "--quiet")
    assert result.exit_code == 2, result.output
    assert expected in " ".join(result.stderr.split()) and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_tag_warns_when_the_label_table_differs(tiny_bundle, catalog_dir, tmp_path):
    same = invoke("tag", catalog_dir / "dev.parquet", "--model", tiny_bundle, "--labels", catalog_dir /
                  "labels.parquet", "--output", tmp_path / "a.parquet", "--quiet")
    assert same.exit_code == 0 and "warning" not in same.stderr
    labels = table(tmp_path, pl.concat([make_labels().filter(~pl.col("label").is_in(["colour:red", "article:cap"])),
                                        NEW]))
    result = invoke("tag", catalog_dir / "dev.parquet", "--model", tiny_bundle, "--labels", labels, "--output",
                    tmp_path / "b.parquet", "--quiet")
    assert result.exit_code == 0, result.output
    line = " ".join(result.stderr.split())
    assert "warning: --labels" in line and "2 label(s) added, 2 retired" in line and "xmctag relabel" in line
    assert "the file is newer than the bundle" in line
    os.utime(labels, (0, 0))  # a table older than the bundle
    renamed = table(tmp_path, make_labels().with_columns(pl.col("text").str.to_uppercase()), "renamed.parquet")
    os.utime(renamed, (0, 0))
    result = invoke("tag", catalog_dir / "dev.parquet", "--model", tiny_bundle, "--labels", renamed, "--output",
                    tmp_path / "c.parquet", "--quiet")
    warned = [line for line in result.stderr.replace("\n ", " ").splitlines() if "warning:" in line]
    assert len(warned) == 1 and "label(s) added" not in warned[0]
    line = " ".join(warned[0].split())
    assert "19 label text(s) changed" in line and "the bundle is newer than the file" in line


def test_vector_maps_recover_what_they_model():
    rng = np.random.default_rng(0)
    e = rng.normal(size=(300, 8))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    counts = np.ones(300)
    # Labels trained as a * e + c (what label-vector training gives a label without products): "scaled" is exact.
    y = np.hstack([1.7 * e, np.full((300, 1), -0.4)])
    scaled = fit_vector_map(e, y, counts, "scaled")
    np.testing.assert_allclose(scaled.apply(e), y, atol=1e-6)
    assert scaled.describe()["scale"] == pytest.approx(1.7) and scaled.describe()["bias"] == pytest.approx(-0.4)
    # A general linear map with an intercept: ridge recovers it (lightly penalised) where "scaled" cannot.
    m = rng.normal(size=(9, 9))
    y = np.hstack([e, np.ones((300, 1))]) @ m
    assert np.abs(fit_vector_map(e, y, counts, "ridge").apply(e) - y).max() < 0.05 * np.abs(y).max()
    assert np.abs(fit_vector_map(e, y, counts, "scaled").apply(e) - y).max() > 0.2 * np.abs(y).max()
    np.testing.assert_allclose(fit_vector_map(e, y, counts, "text").apply(e), np.hstack([e, np.zeros((300, 1))]),
                               atol=1e-6)


def test_pseudo_labels_follow_the_calibrated_threshold():
    rng = np.random.default_rng(1)
    products = rng.normal(size=(1000, 4)).astype(np.float32)
    vectors = np.hstack([rng.normal(size=(3, 4)), np.zeros((3, 1))]).astype(np.float32)

    def rows(start, stop):
        return products[start:stop]

    logits = products @ vectors[:, :4].T
    threshold = calibrate_threshold(rows, 1000, vectors, np.array([100, 50, 10]))
    assert (logits >= threshold).sum() == 160  # as many (product, label) pairs above it as the counts say
    got_rows, got_labels = pseudo_labels(rows, 1000, vectors, threshold, cap=40)
    assert np.bincount(got_labels, minlength=3).max() <= 40
    for label in range(3):
        chosen = got_rows[got_labels == label]
        above = np.flatnonzero(logits[:, label] > threshold)
        best = above[np.argsort(-logits[above, label])][:40]
        assert sorted(chosen.tolist()) == sorted(best.tolist())
    assert (np.diff(got_rows) >= 0).all()
    # A floor: each label also gets its best products whatever their logit (a threshold no product passes).
    got_rows, got_labels = pseudo_labels(rows, 1000, vectors, threshold=1e9, cap=40, floor=3)
    for label in range(3):
        assert sorted(got_rows[got_labels == label].tolist()) == sorted(np.argsort(-logits[:, label])[:3].tolist())
    both_rows, both_labels = pseudo_labels(rows, 1000, vectors, threshold, cap=40, floor=3)
    assert set(zip(both_rows.tolist(), both_labels.tolist())) == set(zip(*pseudo_labels(rows, 1000, vectors,
                                                                                        threshold, 40)))


def test_refit_remakes_only_the_new_vectors(tiny_bundle, tmp_path):
    labels = table(tmp_path, pl.concat([make_labels(), NEW]))
    plain = xmctag.relabel(tiny_bundle, labels, tmp_path / "plain", refit=False, progress=False)
    refit = xmctag.relabel(tiny_bundle, labels, tmp_path / "refit", progress=False)  # the default
    assert "refit" in refit.votes and "refit" not in plain.votes
    a, b = (np.asarray(Bundle.open(tmp_path / name).label_vectors()) for name in ("plain", "refit"))
    np.testing.assert_array_equal(a[:19], b[:19])
    assert not np.array_equal(a[19:], b[19:])
    # the votes are the plain ones: taken before the refit
    assert (tmp_path / "plain/train_labels.npz").read_bytes() == (tmp_path / "refit/train_labels.npz").read_bytes()


def test_label_centroids_are_normalised_means():
    from xmctag.scoring.new_labels import label_centroids

    products = np.random.default_rng(2).normal(size=(40000, 3))
    rows, labels = np.array([3, 20000, 39999, 5]), np.array([0, 0, 0, 2])
    got = label_centroids(rows, labels, 3, lambda a, b: products[a:b], len(products))
    mean = products[[3, 20000, 39999]].mean(axis=0)
    np.testing.assert_allclose(got[0], mean / np.linalg.norm(mean))
    np.testing.assert_allclose(got[2], products[5] / np.linalg.norm(products[5]))
    assert (got[1] == 0).all()


def test_relabel_never_imports_torch(tiny_bundle, tmp_path):
    # relabel runs where tagging runs: ONNX Runtime, faiss, numpy (a fresh interpreter: the tests import torch).
    import subprocess
    import sys
    from pathlib import Path

    labels = table(tmp_path, pl.concat([make_labels().filter(pl.col("label") != "colour:red"), NEW]))
    code = """if True:
        import sys
        import xmctag
        print(xmctag.relabel(sys.argv[1], sys.argv[2], sys.argv[3], refit=True, progress=False).added)
        print(sorted(m for m in sys.modules if m.split(".")[0] == "torch"))
    """
    done = subprocess.run([sys.executable, "-c", code, str(tiny_bundle), str(labels), str(tmp_path / "out")],
                          cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["2", "[]"], done.stdout
