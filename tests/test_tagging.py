"""Tagging with the exported bundle: parity with PyTorch, batch invariance, skips, formats, atomic output."""

import json

import numpy as np
import polars as pl
import pytest
import torch

from xmctag import Tagger, UserError, export, run_dir
from xmctag.evaluation.evaluator import exact_top_k, predict_exact
from xmctag.io.writers import read_parquet_metadata
from xmctag.label_groups import group_ids
from xmctag.models.embedding import encode_texts

TITLES = ["acme red shirt", "zeta blue jeans with a much longer title than the others, and more words", "cap",
          "nova white watch", "orbit pink dress", "lumen grey belt", "acme black socks and a yellow bag"]


@pytest.fixture(scope="module")
def bundle(trained_run, tmp_path_factory):
    return export(trained_run, tmp_path_factory.mktemp("tag") / "bundle", progress=False)


@pytest.fixture(scope="module")
def tagger(bundle):
    # The default: all labels ranked freely (test_one_label_per_exclusive_facet_when_asked has the other way).
    return Tagger.load(bundle, device="cpu")


def test_tokenizers_library_matches_the_training_tokenizer(tagger, trained_run):
    _, hf_tokenizer = run_dir.load_run(trained_run).encoder_and_tokenizer()
    long = " ".join(TITLES)
    expected = hf_tokenizer(TITLES + [long], max_length=16, truncation=True)["input_ids"]
    assert [e.ids for e in tagger.tokenizer.encode_batch(TITLES + [long])] == expected


def test_tagger_matches_pytorch_model_and_exact_search(tagger, trained_run):
    run = run_dir.load_run(trained_run)
    encoder, tokenizer = run.encoder_and_tokenizer()
    with torch.no_grad():
        expected_emb = encode_texts(encoder, tokenizer, TITLES, run.config.max_length)
    np.testing.assert_allclose(tagger.embed(TITLES), expected_emb, atol=1e-5)
    neighbours = run_dir.load_neighbours(trained_run)
    assert neighbours is not None and tagger.knn_neighbours == run.config.knn_neighbours > 0
    expected_top, expected_scores = predict_exact(expected_emb, run.vectors, 5, run.config, neighbours)
    indices, scores = tagger.predict(TITLES, top_k=5)
    np.testing.assert_array_equal(indices, expected_top)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-4, atol=1e-6)
    assert np.all(np.diff(scores, axis=1) <= 0)  # best first
    assert np.all((scores >= 0) & (scores <= 1))
    # With exclusive_groups, one label per exclusive facet, as the exact scoring with the run's groups.
    groups = group_ids(run.labels.exclusive)
    expected_top, expected_scores = predict_exact(expected_emb, run.vectors, 5, run.config, neighbours, groups)
    indices, scores = Tagger.load(tagger.path, device="cpu", exclusive_groups=True).predict(TITLES, top_k=5)
    np.testing.assert_array_equal(indices, expected_top)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-4, atol=1e-6)


def test_without_neighbour_votes_scores_are_label_vector_sigmoids(tagger, trained_run):
    run = run_dir.load_run(trained_run)
    embeddings = tagger.embed(TITLES)
    expected_top, expected_logits = exact_top_k(embeddings, run.vectors, 5)
    saved = tagger.knn_neighbours, tagger.knn_weight
    tagger.knn_neighbours, tagger.knn_weight = 0, 0.0
    try:
        indices, scores = tagger.predict(TITLES, top_k=5)
    finally:
        tagger.knn_neighbours, tagger.knn_weight = saved
    np.testing.assert_array_equal(indices, expected_top)
    np.testing.assert_allclose(scores, 1 / (1 + np.exp(-run.vectors.scale * expected_logits)), rtol=1e-4, atol=1e-6)


def test_int8_graph_is_close_to_fp32_and_precision_is_checked(bundle, tagger):
    int8 = Tagger.load(bundle, device="cpu", precision="int8")
    cosine = (int8.embed(TITLES) * tagger.embed(TITLES)).sum(axis=1)
    assert cosine.min() > 0.95
    with pytest.raises(UserError, match="precision"):
        Tagger.load(bundle, device="cpu", precision="int4")


def test_a_cuda_provider_that_cannot_start_is_never_a_silent_cpu_run(bundle, tagger, monkeypatch):
    # What onnxruntime-gpu does on a machine without a GPU (or without its CUDA libraries): it lists the CUDA
    # provider as available, then starts the session on the CPU with a log line. The CPU build behaves the same way
    # when asked for CUDA, so this runs the real fallback.
    from xmctag.backend import runtime

    monkeypatch.setattr(runtime, "cuda_available", lambda: True)
    with pytest.raises(UserError, match="could not start its CUDA provider"):
        Tagger.load(bundle, device="cuda")
    with pytest.warns(UserWarning, match="tagging on the CPU"):
        fallback = Tagger.load(bundle, device="auto")
    assert fallback.device == "cpu" and fallback.session.get_providers() == ["CPUExecutionProvider"]
    np.testing.assert_array_equal(fallback.embed(TITLES), tagger.embed(TITLES))  # the fp32 graph, not the fp16 one


def test_embedding_and_top_k_do_not_depend_on_batch_neighbours(tagger):
    alone = np.vstack([tagger.embed([t]) for t in TITLES])
    for batch_size in (1, 2, 3, 64):
        tagger.encode_batch_size = batch_size
        np.testing.assert_allclose(tagger.embed(TITLES), alone, atol=1e-6)
        np.testing.assert_array_equal(tagger.predict(TITLES, 5)[0], np.vstack([tagger.predict([t], 5)[0]
                                                                                  for t in TITLES]))
    tagger.encode_batch_size = 64


def test_tag_frame(tagger):
    frame = pl.DataFrame({"id": [1, 2, 3], "title": ["acme red shirt", None, "  "]})
    out = tagger.tag(frame, top_k=3)
    assert out["id"].to_list() == ["1"]  # rows without text are left out
    assert out["labels"][0].len() == 3
    assert set(out["labels"][0].to_list()) >= {"colour:red", "article:shirt"}


def write_catalog(path, titles, ids=None):
    ids = ids or [f"c{i}" for i in range(len(titles))]
    pl.DataFrame({"id": ids, "title": titles, "extra": [1] * len(titles)}).write_parquet(path)
    return path


def test_tag_file_streams_skips_and_writes_parquet_with_metadata(tagger, tmp_path):
    titles = TITLES * 30 + [None, ""]
    catalog = write_catalog(tmp_path / "cat.parquet", titles)
    summary = tagger.tag_file(catalog, tmp_path / "out.parquet", top_k=4, batch_size=50, progress=False)
    assert summary.rows_read == len(titles) and summary.rows_tagged == len(titles) - 2
    assert summary.skipped == {"empty text": 2}
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out.columns == ["id", "labels", "scores"]
    assert out.schema["scores"] == pl.List(pl.Float32)
    assert out["id"].to_list() == [f"c{i}" for i in range(len(titles) - 2)]  # input order kept
    assert (out["labels"].list.len() == 4).all()
    expected = tagger.tag(pl.DataFrame({"id": ["x"], "title": [TITLES[1]]}), top_k=4)["labels"][0].to_list()
    assert out["labels"][1].to_list() == expected
    meta = read_parquet_metadata(tmp_path / "out.parquet")
    assert meta["bundle_id"] == tagger.bundle_id and meta["top_k"] == "4"


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_long_formats_one_row_per_rank(tagger, tmp_path, fmt):
    catalog = write_catalog(tmp_path / "cat.parquet", TITLES)
    tagger.tag_file(catalog, tmp_path / f"out.{fmt}", top_k=3, fmt=fmt, batch_size=3, progress=False)
    out = pl.read_csv(tmp_path / "out.csv") if fmt == "csv" else pl.read_ndjson(tmp_path / "out.jsonl")
    assert out.columns == ["id", "rank", "label", "label_text", "score", "bundle_id"]
    assert out.height == 3 * len(TITLES)
    assert out["rank"].to_list()[:3] == [1, 2, 3]
    assert (out["bundle_id"] == tagger.bundle_id).all()
    assert out.filter(pl.col("id") == "c0")["label_text"].to_list()[0].startswith(("colour", "article"))


def test_min_score_drops_low_scores(tagger, tmp_path):
    catalog = write_catalog(tmp_path / "cat.parquet", TITLES)
    tagger.tag_file(catalog, tmp_path / "out.parquet", top_k=5, min_score=0.5, progress=False)
    out = pl.read_parquet(tmp_path / "out.parquet")
    scores = out["scores"].explode().drop_nulls()
    assert (scores >= 0.5).all()
    assert out["labels"].list.len().max() < 5


def test_strict_failure_mid_run_leaves_no_output(tagger, tmp_path):
    titles = TITLES * 20 + [None] + TITLES
    catalog = write_catalog(tmp_path / "cat.parquet", titles)
    output = tmp_path / "out.parquet"
    with pytest.raises(UserError, match=r"row 140 \(id 'c140'\) has no text"):
        tagger.tag_file(catalog, output, batch_size=16, strict=True, progress=False)
    assert list(tmp_path.iterdir()) == [catalog]  # no output, no temporary file
    output.write_text("previous predictions")
    with pytest.raises(UserError):
        tagger.tag_file(catalog, output, batch_size=16, strict=True, progress=False)
    assert output.read_text() == "previous predictions"  # an old output survives a failed run


def test_bad_inputs_are_clear_errors(tagger, tmp_path):
    pl.DataFrame({"id": ["a"], "name": ["red shirt"]}).write_parquet(tmp_path / "nocol.parquet")
    with pytest.raises(UserError, match=r"nocol.parquet: missing column\(s\) title"):
        tagger.tag_file(tmp_path / "nocol.parquet", tmp_path / "o.parquet", progress=False)
    (tmp_path / "garbage.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(UserError, match="garbage.parquet: not a readable Parquet file"):
        tagger.tag_file(tmp_path / "garbage.parquet", tmp_path / "o.parquet", progress=False)
    with pytest.raises(UserError, match="no such file"):
        tagger.tag_file(tmp_path / "missing.parquet", progress=False)
    with pytest.raises(UserError, match="--format"):
        tagger.tag_file(write_catalog(tmp_path / "ok.parquet", TITLES), tmp_path / "o.xml", fmt="xml",
                        progress=False)
    assert not list(tmp_path.glob("o.*")) and not list(tmp_path.glob(".o*"))


def test_bundle_problems_are_clear_errors(trained_run, bundle, copy_of, tmp_path):
    with pytest.raises(UserError, match="training run, not a bundle"):
        Tagger.load(trained_run)
    with pytest.raises(UserError, match="no such bundle"):
        Tagger.load(tmp_path / "nothing")
    broken = copy_of(bundle)
    (broken / "labels.faiss").unlink()
    with pytest.raises(UserError, match="labels.faiss is missing"):
        Tagger.load(broken)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["dims"]["labels"] == len(Tagger.load(bundle, verify=False).label_ids)


def test_one_label_per_exclusive_facet_when_asked(trained_run, bundle, tagger):
    # The synthetic catalog's labels are "colour:..." and "article:...", one of each per training product.
    saved = pl.read_parquet(trained_run / run_dir.LABELS)
    assert set(saved["exclusive_group"].drop_nulls()) == {"colour", "article"}
    assert "Exclusive facets (`tag --exclusive-groups` keeps the best label of each): article, colour" in (
        trained_run / run_dir.CARD).read_text()
    grouped = Tagger.load(bundle, device="cpu", exclusive_groups=True)
    indices, _ = grouped.predict(TITLES, top_k=5)
    for row in indices:
        assert sorted(grouped.label_ids[j].split(":")[0] for j in row if j >= 0) == ["article", "colour"]
    free, _ = tagger.predict(TITLES, top_k=5)  # the default
    assert (free >= 0).all()  # five labels each, so two colours or two articles among them
    np.testing.assert_array_equal(free[:, 0], indices[:, 0])  # the best label is the same either way


def test_exclusive_groups_on_a_bundle_without_any_say_so(bundle, tagger, copy_of):
    plain = copy_of(bundle)
    labels = pl.read_parquet(plain / run_dir.LABELS)
    labels.with_columns(pl.lit(None, pl.String).alias("exclusive_group")).write_parquet(plain / run_dir.LABELS)
    with pytest.warns(UserWarning, match="no exclusive label groups"):
        grouped = Tagger.load(plain, device="cpu", verify=False, exclusive_groups=True)
    np.testing.assert_array_equal(grouped.predict(TITLES)[0], tagger.predict(TITLES)[0])
