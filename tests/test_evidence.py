"""tag --evidence N: per product, the training products whose neighbour votes gave most to its labels, as the
scoring.evidence docstring defines them; off by default; bundles without training ids or neighbours refuse it."""

import json

import numpy as np
import polars as pl
import pytest
from conftest import write_catalog
from typer.testing import CliRunner

from xmctag import Tagger, UserError, run_dir
from xmctag.cli import app
from xmctag.io.predictions import read_prediction_products
from xmctag.manifest import seal

TITLES = ["acme red shirt", "zeta blue jeans", "nova white watch", "orbit pink dress", "lumen grey belt",
          "acme black socks and a yellow bag", "cap", "green umbrella", "red red red", "zeta jacket"]


def expected_contributions(tagger, trained_run, catalog_dir, texts, labels, n):
    """Per product: the training rows' contributions (vote weight x returned labels carried) computed directly from
    the run's training embeddings and the training catalog's labels, best ``n`` first (> 0 only), and a function
    (row, product) -> contribution and similarity."""
    embeddings, _ = run_dir.load_neighbours(trained_run)
    train = pl.read_parquet(catalog_dir / "train.parquet")
    sims = tagger.embed(texts) @ np.asarray(embeddings).T
    k, temperature = tagger.knn_neighbours, tagger.knn_temperature
    top = np.argsort(-sims, axis=1)[:, :k]
    carried = [[len(set(row) & set(returned)) for row in train["labels"].to_list()] for returned in labels]

    def contribution(i, j):  # any training row (a tie at the k-th place may have been found instead of another)
        s = sims[i, top[i]]
        return np.exp(temperature * (sims[i, j] - s.max())) / np.exp(temperature * (s - s.max())).sum() * \
            carried[i][j]

    expected = [sorted((c for c in (contribution(i, int(j)) for j in top[i]) if c > 0), reverse=True)[:n]
                for i in range(len(texts))]
    return expected, contribution, sims, train


def test_evidence_ids_are_the_training_products_that_voted_most(tagger, trained_run, catalog_dir):
    out = tagger.tag(pl.DataFrame({"id": [f"q{i}" for i in range(len(TITLES))], "title": TITLES}), top_k=3,
                     evidence=4)
    assert out.columns == ["id", "labels", "scores", "evidence_ids", "evidence_scores"]
    labels = out["labels"].to_list()
    expected, contribution, sims, train = expected_contributions(tagger, trained_run, catalog_dir, TITLES, labels, 4)
    row_of = {product: j for j, product in enumerate(train["id"].to_list())}
    for i, (ids, scores) in enumerate(zip(out["evidence_ids"].to_list(), out["evidence_scores"].to_list())):
        assert 0 < len(ids) <= 4 and len(ids) == len(scores) == len(set(ids))
        rows = [row_of[x] for x in ids]  # training products, by their ids in the training catalog
        for j in rows:  # each carries at least one of the labels the product was given
            assert set(train["labels"][j].to_list()) & set(labels[i])
        got = [contribution(i, j) for j in rows]
        np.testing.assert_allclose(got, expected[i], atol=1e-6)  # the largest contributions, largest first
        np.testing.assert_allclose(scores, sims[i, rows], atol=1e-5)  # their similarities (cosine)
        for a, b, sa, sb in zip(got, got[1:], scores, scores[1:]):  # ties: by similarity, higher first
            assert a > b + 1e-9 or sa >= sb - 1e-6


def test_evidence_is_off_by_default_and_the_same_in_every_format(tagger, tmp_path):
    catalog = write_catalog(tmp_path / "cat.parquet", TITLES)
    assert tagger.tag(pl.read_parquet(catalog)).columns == ["id", "labels", "scores"]
    tagger.tag_file(catalog, tmp_path / "plain.parquet", progress=False)
    assert pl.read_parquet(tmp_path / "plain.parquet").columns == ["id", "labels", "scores", "content_hash"]
    for fmt in ("parquet", "csv", "jsonl"):
        tagger.tag_file(catalog, tmp_path / f"ev.{fmt}", top_k=3, evidence=2, progress=False, batch_size=4)
    parquet = pl.read_parquet(tmp_path / "ev.parquet")
    assert parquet.schema["evidence_ids"] == pl.List(pl.String)
    assert parquet.schema["evidence_scores"] == pl.List(pl.Float32)
    assert (parquet["evidence_ids"].list.len() <= 2).all() and (parquet["evidence_ids"].list.len() > 0).any()
    direct = tagger.tag(pl.read_parquet(catalog), top_k=3, evidence=2)
    assert parquet["evidence_ids"].to_list() == direct["evidence_ids"].to_list()
    csv = pl.read_csv(tmp_path / "ev.csv", infer_schema=False)
    assert csv["evidence_ids"][0] == json.dumps(parquet["evidence_ids"][0].to_list(), separators=(",", ":"))
    assert pl.read_ndjson(tmp_path / "ev.jsonl").schema["evidence_ids"] == pl.List(pl.String)  # JSON arrays
    for fmt in ("csv", "jsonl"):
        products = read_prediction_products(tmp_path / f"ev.{fmt}")
        assert products["evidence_ids"].to_list() == parquet["evidence_ids"].to_list()
        for a, b in zip(products["evidence_scores"].to_list(), parquet["evidence_scores"].to_list()):
            np.testing.assert_allclose(a, b, atol=1e-6)


def test_more_evidence_than_neighbours_is_capped(tagger):
    out = tagger.tag(pl.DataFrame({"id": ["a"], "title": ["acme red shirt"]}), evidence=1000)
    assert 0 < out["evidence_ids"][0].len() <= tagger.knn_neighbours


def without(bundle, names, **dims):
    """A bundle without the files ``names`` (and its manifest's dims/scoring changed), sealed again."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    for name in names:
        (bundle / name).unlink()
    for key, value in dims.items():
        manifest["dims"][key] = value
        manifest["scoring"]["knn_neighbours"] = value
        if key == "neighbours" and not value:  # as export writes a bundle without neighbours: no search for them
            manifest["index"].pop("neighbours", None)
    seal(bundle, manifest)
    return bundle


def test_a_bundle_without_training_ids_refuses_evidence_but_tags(tiny_bundle, copy_of, tmp_path):
    bundle = without(copy_of(tiny_bundle), [run_dir.TRAIN_IDS])
    catalog = write_catalog(tmp_path / "cat.parquet", TITLES)
    tagger = Tagger.load(bundle, device="cpu")
    with pytest.raises(UserError, match=f"--evidence: {bundle} has no train_ids.parquet .*retrain"):
        tagger.tag_file(catalog, tmp_path / "out.parquet", evidence=3, progress=False)
    assert not (tmp_path / "out.parquet").exists()
    assert tagger.tag_file(catalog, tmp_path / "out.parquet", progress=False).rows_tagged == len(TITLES)
    result = CliRunner().invoke(app, ["tag", str(catalog), "--model", str(bundle), "--evidence", "2", "-q", "-o",
                                      str(tmp_path / "cli.parquet")], catch_exceptions=False)
    assert result.exit_code == 2 and "has no train_ids.parquet" in result.stderr


def test_a_bundle_without_neighbours_refuses_evidence(tiny_bundle, copy_of, tmp_path, tagger):
    bundle = without(copy_of(tiny_bundle), ["neighbours.faiss", run_dir.TRAIN_LABELS, run_dir.TRAIN_IDS],
                     neighbours=0)
    catalog = write_catalog(tmp_path / "cat.parquet", TITLES)
    with pytest.raises(UserError, match="no neighbour index .*knn_neighbours 0"):
        Tagger.load(bundle, device="cpu").tag_file(catalog, tmp_path / "out.parquet", evidence=1, progress=False)
    tagger.knn_neighbours = 0  # the neighbour votes switched off on a loaded bundle
    with pytest.raises(UserError, match="knn_neighbours 0"):
        tagger.tag(pl.read_parquet(catalog), evidence=1)


def test_the_run_and_the_bundle_hold_the_training_ids(trained_run, tiny_bundle, catalog_dir):
    ids = pl.read_parquet(trained_run / run_dir.TRAIN_IDS)["id"].to_list()
    assert ids == pl.read_parquet(catalog_dir / "train.parquet")["id"].to_list()  # row j of the neighbour index
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    assert run_dir.TRAIN_IDS in manifest["files"] and manifest["dims"]["neighbours"] == len(ids)


def test_top_evidence_orders_by_contribution_then_similarity_then_row():
    from xmctag.scoring import NeighbourLabels
    from xmctag.scoring.evidence import top_evidence

    # Training rows 0-4 carry labels: 0 {0, 1}, 1 {0}, 2 {1}, 3 {2}, 4 {0}.
    labels = NeighbourLabels.from_lists([np.array([0, 1]), np.array([0]), np.array([1]), np.array([2]), np.array([0])])
    neighbours = np.array([[1, 4, 0, 3, 2, -1]])
    sims = np.array([[0.9, 0.9, 0.8, 0.95, 0.5, 0.0]], dtype=np.float32)
    returned = np.array([[0, 1, -1]])  # the product was given labels 0 and 1
    rows, scores = top_evidence(labels, neighbours, sims, 0.0, returned, 10)  # T = 0: equal vote weights
    # Row 0 carries both returned labels (2 shares); rows 1 and 4 (0.9) and 2 (0.5) one each: by similarity, then
    # row; row 3 carries none and the empty slot is nobody: neither is evidence.
    assert rows[0].tolist() == [0, 1, 4, 2, -1, -1]
    np.testing.assert_allclose(scores[0], [0.8, 0.9, 0.9, 0.5, 0.0, 0.0])
    rows, _ = top_evidence(labels, neighbours, sims, 0.0, returned, 2)
    assert rows.shape == (1, 2) and rows[0].tolist() == [0, 1]
    rows, _ = top_evidence(labels, neighbours, sims, 0.0, np.array([[2, -1, -1]]), 3)
    assert rows[0].tolist() == [3, -1, -1]
    rows, _ = top_evidence(labels, neighbours, sims, 0.0, np.full((1, 3), -1), 3)  # no label given: no evidence
    assert rows[0].tolist() == [-1, -1, -1]
