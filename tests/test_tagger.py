"""Tagger: parity with PyTorch and exact search, batch invariance, exclusive facets, streaming tag_file with skips
and thresholds, tagging without torch."""

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from conftest import write_catalog

from xmctag import Tagger, UserError, run_dir
from xmctag.evaluation.evaluator import exact_top_k, predict_exact
from xmctag.io.predictions import read_parquet_metadata
from xmctag.label_groups import group_ids
from xmctag.lexical import LexicalModel
from xmctag.models.embedding import encode_texts

TITLES = ["acme red shirt", "zeta blue jeans with a much longer title than the others, and more words", "cap",
          "nova white watch", "orbit pink dress", "lumen grey belt", "acme black socks and a yellow bag"]


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
    lexical_model = LexicalModel.load(trained_run / run_dir.LEXICAL)  # the run's, as trained
    top, lexical_scores = lexical_model.predict(TITLES)
    lexical = (top, lexical_scores, lexical_model.label_weights(run.train_counts))
    assert tagger.lexical is not None and top.shape == (len(TITLES), run.config.lexical_candidates)
    expected_top, expected_scores = predict_exact(expected_emb, run.vectors, 5, run.config, neighbours,
                                                  lexical=lexical)
    indices, scores = tagger.predict(TITLES, top_k=5)
    np.testing.assert_array_equal(indices, expected_top)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-4, atol=1e-6)
    assert np.all(np.diff(scores, axis=1) <= 0)  # best first
    assert np.all((scores >= 0) & (scores <= 1))
    # With exclusive_groups, one label per exclusive facet, as the exact scoring with the run's groups.
    groups = group_ids(run.labels.exclusive)
    expected_top, expected_scores = predict_exact(expected_emb, run.vectors, 5, run.config, neighbours, groups,
                                                  lexical)
    indices, scores = Tagger.load(tagger.path, device="cpu", exclusive_groups=True).predict(TITLES, top_k=5)
    np.testing.assert_array_equal(indices, expected_top)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-4, atol=1e-6)


def test_without_neighbour_votes_scores_are_label_vector_sigmoids(tagger, trained_run):
    run = run_dir.load_run(trained_run)
    embeddings = tagger.embed(TITLES)
    expected_top, expected_logits = exact_top_k(embeddings, run.vectors, 5)
    tagger.knn_neighbours, tagger.knn_weight, tagger.lexical = 0, 0.0, None  # this test's own Tagger
    indices, scores = tagger.predict(TITLES, top_k=5)
    np.testing.assert_array_equal(indices, expected_top)
    np.testing.assert_allclose(scores, 1 / (1 + np.exp(-run.vectors.scale * expected_logits)), rtol=1e-4, atol=1e-6)


def test_int8_graph_is_close_to_fp32_and_precision_is_checked(bundle, tagger, catalog_dir):
    int8 = Tagger.load(bundle, device="cpu", precision="int8")
    cosine = (int8.embed(TITLES) * tagger.embed(TITLES)).sum(axis=1)
    assert cosine.min() > 0.95
    # What tagging gives, not only the angle: the top-5 labels of the dev products mostly agree with fp32's.
    titles = pl.read_parquet(catalog_dir / "dev.parquet")["title"].to_list()
    fp32_top, int8_top = tagger.predict(titles, top_k=5)[0], int8.predict(titles, top_k=5)[0]
    shared = np.array([len(set(a) & set(b)) / 5 for a, b in zip(fp32_top, int8_top)])
    assert shared.mean() >= 0.8 and shared.min() >= 0.6, shared
    assert (fp32_top[:, 0] == int8_top[:, 0]).mean() >= 0.95  # the best label
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
        tagger.encode_batch_size = batch_size  # this test's own Tagger
        np.testing.assert_allclose(tagger.embed(TITLES), alone, atol=1e-6)
        np.testing.assert_array_equal(tagger.predict(TITLES, 5)[0], np.vstack([tagger.predict([t], 5)[0]
                                                                                  for t in TITLES]))


def test_tag_frame(tagger):
    frame = pl.DataFrame({"id": [1, 2, 3], "title": ["acme red shirt", None, "  "]})
    out = tagger.tag(frame, top_k=3)
    assert out["id"].to_list() == ["1"]  # rows without text are left out
    assert out["labels"][0].len() == 3
    assert set(out["labels"][0].to_list()) >= {"colour:red", "article:shirt"}


def test_tag_file_streams_skips_and_writes_parquet_with_metadata(tagger, tmp_path, writer_spy, monkeypatch):
    import pyarrow.parquet as pq

    titles = TITLES * 30 + [None, ""]
    catalog = write_catalog(tmp_path / "cat.parquet", titles)
    embed = tagger.embed
    monkeypatch.setattr(tagger, "embed", lambda texts, *args: (writer_spy.events.append(("embed", len(texts))),
                                                               embed(texts, *args))[1])
    summary = tagger.tag_file(catalog, tmp_path / "out.parquet", top_k=4, batch_size=50, progress=False)
    # Streamed: each batch of 50 rows read is encoded, then appended to the output, before the next is read.
    assert writer_spy.events == [("embed", 50), ("write", 50)] * 4 + [("embed", 10), ("write", 10)]
    assert pq.ParquetFile(tmp_path / "out.parquet").num_row_groups == 5  # one row group per append
    assert summary.rows_read == len(titles) and summary.rows_tagged == len(titles) - 2
    assert summary.skipped == {"empty text": 2}
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out.columns == ["id", "labels", "scores", "content_hash"]
    assert out.schema["scores"] == pl.List(pl.Float32)
    assert out["id"].to_list() == [f"p{i}" for i in range(len(titles) - 2)]  # input order kept
    assert (out["labels"].list.len() == 4).all()
    expected = tagger.tag(pl.DataFrame({"id": ["x"], "title": [TITLES[1]]}), top_k=4)["labels"][0].to_list()
    assert out["labels"][1].to_list() == expected
    meta = read_parquet_metadata(tmp_path / "out.parquet")
    assert meta["bundle_id"] == tagger.bundle_id and meta["top_k"] == "4"


def test_min_score_drops_low_scores(tagger, tmp_path):
    catalog = write_catalog(tmp_path / "cat.parquet", TITLES)
    tagger.tag_file(catalog, tmp_path / "all.parquet", top_k=5, progress=False)
    unfiltered = pl.read_parquet(tmp_path / "all.parquet")
    threshold = float(np.median(unfiltered["scores"].explode().to_numpy()))  # about half the labels go
    tagger.tag_file(catalog, tmp_path / "cut.parquet", top_k=5, min_score=threshold, progress=False)
    cut = pl.read_parquet(tmp_path / "cut.parquet")
    # Exactly the unfiltered predictions without the scores below the threshold, in the same order.
    expected = [[(label, score) for label, score in zip(labels, scores) if score >= threshold]
                for labels, scores in zip(unfiltered["labels"].to_list(), unfiltered["scores"].to_list())]
    got = [list(zip(labels, scores)) for labels, scores in zip(cut["labels"].to_list(), cut["scores"].to_list())]
    assert cut["id"].to_list() == unfiltered["id"].to_list()
    assert got == expected
    assert 0 < sum(map(len, got)) < 5 * len(TITLES)  # some labels dropped, some kept


def test_strict_failure_mid_run_leaves_no_output(tagger, tmp_path):
    titles = TITLES * 20 + [None] + TITLES
    catalog = write_catalog(tmp_path / "cat.parquet", titles)
    output = tmp_path / "out.parquet"
    with pytest.raises(UserError, match=r"row 140 \(id 'p140'\) has no text"):
        tagger.tag_file(catalog, output, batch_size=16, strict=True, progress=False)
    assert list(tmp_path.iterdir()) == [catalog]  # no output, no temporary file
    output.write_text("previous predictions")
    with pytest.raises(UserError):
        tagger.tag_file(catalog, output, batch_size=16, strict=True, progress=False)
    assert output.read_text() == "previous predictions"  # an old output survives a failed run


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


def test_tagging_never_imports_torch(bundle, tmp_path):
    # The tagging side needs ONNX Runtime, faiss, tokenizers and polars only: a machine without torch tags.
    import subprocess
    import sys

    catalog = write_catalog(tmp_path / "cat.parquet", TITLES)
    code = """if True:
        import sys
        from xmctag import Tagger
        from xmctag.cli import app
        tagger = Tagger.load(sys.argv[1], device="cpu")
        print(tagger.tag_file(sys.argv[2], sys.argv[3], top_k=3, progress=False).rows_tagged)
        try:
            app(["tag", sys.argv[2], "--model", sys.argv[1], "-o", sys.argv[4], "--quiet"])
        except SystemExit as e:
            assert e.code in (0, None), e.code
        print(sorted(m for m in sys.modules if m.split(".")[0] == "torch"))
    """
    done = subprocess.run([sys.executable, "-c", code, str(bundle), str(catalog), str(tmp_path / "api.parquet"),
                           str(tmp_path / "cli.csv")], cwd=Path(__file__).parent.parent, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == [str(len(TITLES)), "[]"], done.stdout  # tagged, and no torch module
    assert pl.read_csv(tmp_path / "cli.csv")["id"].n_unique() == len(TITLES)


# -- options, duplicates and empty results -------------------------------------------------------------------------
def test_exclusive_groups_search_again_when_the_candidates_are_one_facet(bundle, tagger, monkeypatch):
    # One candidate per product (and no neighbour labels): one place of two. The tagger must widen its faiss search
    # and give what a pool of every label gives.
    from xmctag.scoring import ranking

    grouped = Tagger.load(bundle, device="cpu", exclusive_groups=True)
    grouped.knn_neighbours, grouped.knn_weight = 0, 0.0
    full, full_scores = grouped.predict(TITLES, top_k=2)
    monkeypatch.setattr(ranking, "label_vector_candidates", lambda k: 1)
    narrow, narrow_scores = grouped.predict(TITLES, top_k=2)
    np.testing.assert_array_equal(narrow, full)
    np.testing.assert_allclose(narrow_scores, full_scores, rtol=1e-6)
    assert (narrow >= 0).all()


def test_top_k_is_capped_at_the_number_of_labels(tagger, tmp_path):
    n_labels = len(tagger.label_ids)
    indices, scores = tagger.predict(TITLES, top_k=100_000)
    assert indices.shape == scores.shape == (len(TITLES), n_labels) and (indices >= 0).all()
    catalog = write_catalog(tmp_path / "cat.parquet", TITLES)
    tagger.tag_file(catalog, tmp_path / "out.parquet", top_k=10**9, progress=False)
    assert (pl.read_parquet(tmp_path / "out.parquet")["labels"].list.len() == n_labels).all()
    assert read_parquet_metadata(tmp_path / "out.parquet")["top_k"] == str(n_labels)


@pytest.mark.parametrize("min_score", [-0.1, 1.5, float("nan")])
def test_min_score_must_be_a_score(tagger, tmp_path, min_score):
    catalog = write_catalog(tmp_path / "cat.parquet", TITLES)
    with pytest.raises(UserError, match=r"--min-score must be between 0 and 1 \(scores are in \[0, 1\]\), not"):
        tagger.tag_file(catalog, tmp_path / "out.parquet", min_score=min_score, progress=False)
    with pytest.raises(UserError, match="--min-score must be between 0 and 1"):
        tagger.predict(TITLES, min_score=min_score)
    assert list(tmp_path.iterdir()) == [catalog]


def test_products_without_a_label_above_min_score_are_counted(tagger, tmp_path):
    catalog = write_catalog(tmp_path / "cat.parquet", TITLES)
    summary = tagger.tag_file(catalog, tmp_path / "out.parquet", top_k=3, min_score=1.0, progress=False)
    assert summary.rows_tagged == len(TITLES) and summary.without_labels == len(TITLES)
    out = pl.read_parquet(tmp_path / "out.parquet")  # Parquet: every product, with an empty list
    assert out["id"].to_list() == [f"p{i}" for i in range(len(TITLES))] and (out["labels"].list.len() == 0).all()
    summary = tagger.tag_file(catalog, tmp_path / "out.csv", top_k=3, min_score=0.0, progress=False)
    assert summary.without_labels == 0
