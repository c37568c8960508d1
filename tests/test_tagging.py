"""Tagging with the exported bundle: parity with PyTorch, batch invariance, skips, formats, atomic output."""

import copy
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from xmctag import Tagger, UserError, run_dir
from xmctag.evaluation.evaluator import exact_top_k, predict_exact
from xmctag.io.predictions import read_parquet_metadata
from xmctag.label_groups import group_ids
from xmctag.manifest import seal
from xmctag.models.embedding import encode_texts
from xmctag.summary import RunChecks

TITLES = ["acme red shirt", "zeta blue jeans with a much longer title than the others, and more words", "cap",
          "nova white watch", "orbit pink dress", "lumen grey belt", "acme black socks and a yellow bag"]


@pytest.fixture()
def bundle(tiny_bundle):
    """The shared export of the tiny run (read-only: change a copy_of it)."""
    return tiny_bundle


@pytest.fixture(scope="module")
def loaded(tiny_bundle):
    """The shared bundle loaded once per module (Tagger.load takes ~0.3 s, most of it the runtime package check);
    tests get copies of it (``tagger``), never this one."""
    return Tagger.load(tiny_bundle, device="cpu")


@pytest.fixture()
def tagger(loaded):
    """A Tagger of the test's own (tests change its settings: encode_batch_size, the neighbour votes, methods
    patched on the instance): a copy of ``loaded`` whose settings, manifest and label arrays are its own; the ONNX
    session and the faiss indexes, which tagging only reads, are shared. The default: all labels ranked freely
    (test_one_label_per_exclusive_facet_when_asked has the other way)."""
    own = copy.copy(loaded)
    own.manifest, own.config = copy.deepcopy(loaded.manifest), copy.deepcopy(loaded.config)
    own.label_ids, own.label_texts = loaded.label_ids.copy(), loaded.label_texts.copy()
    return own


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
    tagger.knn_neighbours, tagger.knn_weight = 0, 0.0  # this test's own Tagger
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


def write_catalog(path, titles, ids=None):
    ids = ids or [f"c{i}" for i in range(len(titles))]
    pl.DataFrame({"id": ids, "title": titles, "extra": [1] * len(titles)}).write_parquet(path)
    return path


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
    assert out.columns == ["id", "labels", "scores"]
    assert out.schema["scores"] == pl.List(pl.Float32)
    assert out["id"].to_list() == [f"c{i}" for i in range(len(titles) - 2)]  # input order kept
    assert (out["labels"].list.len() == 4).all()
    expected = tagger.tag(pl.DataFrame({"id": ["x"], "title": [TITLES[1]]}), top_k=4)["labels"][0].to_list()
    assert out["labels"][1].to_list() == expected
    meta = read_parquet_metadata(tmp_path / "out.parquet")
    assert meta["bundle_id"] == tagger.bundle_id and meta["top_k"] == "4"


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
        assert out.columns == ["id", "rank", "label", "label_text", "score", "bundle_id", "bundle"]
        got = out.select("id", pl.col("rank").cast(pl.Int64), "label", "label_text",
                         pl.col("score").cast(pl.Float32))
        assert got.equals(expected), (got, expected)  # same rows, same order, same float32 scores
        assert (out["bundle_id"] == tagger.bundle_id).all()
        assert (out["bundle"] == str(tagger.path.resolve())).all()


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
    with pytest.raises(UserError, match=r"garbage.parquet: not a Parquet file \(xmctag tag reads Parquet catalogs"):
        tagger.tag_file(tmp_path / "garbage.parquet", tmp_path / "o.parquet", progress=False)
    (tmp_path / "truncated.parquet").write_bytes(b"PAR1 and then nothing")
    with pytest.raises(UserError, match="truncated.parquet: not a readable Parquet file"):
        tagger.tag_file(tmp_path / "truncated.parquet", tmp_path / "o.parquet", progress=False)
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


# -- bad input: clear errors naming the file and column, or counted skips ------------------------------------------
@pytest.mark.parametrize("column,values,dtype", [
    ("title", [["red", "shirt"], ["blue"]], pl.List(pl.String)),
    ("title", [{"a": "red"}, {"a": "blue"}], pl.Struct({"a": pl.String})),
    ("title", [b"red shirt", b"blue"], pl.Binary),
    ("id", [["a"], ["b"]], pl.List(pl.String)),
])
def test_a_column_that_is_not_text_is_a_clear_error(tagger, tmp_path, column, values, dtype):
    data = {"id": ["a", "b"], "title": ["red shirt", "blue jeans"], column: pl.Series(values, dtype=dtype)}
    catalog = tmp_path / "typed.parquet"
    pl.DataFrame(data).write_parquet(catalog)
    pattern = rf"typed.parquet: column '{column}' has type {pl.DataFrame(data).schema[column]}".replace("(", r"\(")
    with pytest.raises(UserError, match=pattern.replace(")", r"\)")):
        tagger.tag_file(catalog, tmp_path / "out.parquet", progress=False)
    with pytest.raises(UserError, match=f"frame: column '{column}' has type"):
        tagger.tag(pl.DataFrame(data))
    assert list(tmp_path.iterdir()) == [catalog]


def test_numeric_text_and_id_columns_are_read_as_strings(tagger, tmp_path):
    catalog = tmp_path / "numbers.parquet"
    pl.DataFrame({"id": [7, 8], "title": [123, 456]}).write_parquet(catalog)
    summary = tagger.tag_file(catalog, tmp_path / "out.parquet", top_k=2, progress=False)
    assert summary.rows_tagged == 2
    assert pl.read_parquet(tmp_path / "out.parquet")["id"].to_list() == ["7", "8"]


def test_a_catalog_that_is_not_parquet_is_caught_by_its_content(tagger, tmp_path):
    frame = pl.DataFrame({"id": ["a", "b"], "title": ["acme red shirt", "blue jeans"]})
    frame.write_csv(tmp_path / "cat.csv")
    frame.write_csv(tmp_path / "csv-named.parquet")
    for name in ("cat.csv", "csv-named.parquet"):
        with pytest.raises(UserError, match=rf"{name}: not a Parquet file \(xmctag tag reads Parquet catalogs\)"):
            tagger.tag_file(tmp_path / name, tmp_path / "out.parquet", progress=False)
    frame.write_parquet(tmp_path / "parquet-named.csv")  # the content decides, not the extension
    assert tagger.tag_file(tmp_path / "parquet-named.csv", tmp_path / "out.parquet", progress=False).rows_tagged == 2


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


def test_rows_without_an_id_are_skipped_and_counted(tagger, tmp_path):
    ids = ["a", None, "", "  ", "b", None, "c"]
    titles = ["acme red shirt", "blue jeans", "cap", "nova watch", None, None, "  "]
    catalog = write_catalog(tmp_path / "cat.parquet", titles, ids=ids)
    summary = tagger.tag_file(catalog, tmp_path / "out.parquet", top_k=2, batch_size=3, progress=False)
    assert summary.rows_read == 7 and summary.rows_tagged == 1
    assert summary.skipped == {"no id": 4, "empty text": 2}  # a row with neither counts once, as "no id"
    assert pl.read_parquet(tmp_path / "out.parquet")["id"].to_list() == ["a"]
    with pytest.raises(UserError, match=r"cat.parquet: row 1 has no id in column 'id' \(--strict\)"):
        tagger.tag_file(catalog, tmp_path / "strict.parquet", strict=True, progress=False)
    assert not (tmp_path / "strict.parquet").exists()
    out = tagger.tag(pl.DataFrame({"id": [None, "x"], "title": ["red shirt", "blue jeans"]}), top_k=2)
    assert out["id"].to_list() == ["x"]


def test_a_broken_manifest_is_a_clear_error(bundle, copy_of):
    broken = copy_of(bundle)
    manifest_path = broken / "manifest.json"
    good = json.loads(manifest_path.read_text())
    cases = [
        ({k: v for k, v in good.items() if k != "files"}, "missing key 'files'"),
        ({k: v for k, v in good.items() if k != "tokenization"}, "missing key 'tokenization'"),
        ({**good, "dims": {"embedding": 32}}, "missing key 'dims.index'"),
        ({**good, "files": ["encoder.onnx"]}, "invalid key 'files'"),
        ({k: v for k, v in good.items() if k != "format"}, "missing key 'format'"),
        (["not", "an", "object"], "not a JSON object"),
    ]
    for manifest, message in cases:
        manifest_path.write_text(json.dumps(manifest))
        with pytest.raises(UserError, match=rf"manifest.json: {message}.* \(re-export the bundle\)"):
            Tagger.load(broken, device="cpu")
    manifest_path.write_text("{ not json")
    with pytest.raises(UserError, match=r"manifest.json: not valid JSON .*\(re-export the bundle\)"):
        Tagger.load(broken, device="cpu")


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



def test_a_catalog_corrupt_mid_file_fails_cleanly(tagger, tmp_path):
    # Header and footer intact, a data page in the middle overwritten: the error comes after some batches were
    # tagged, and still no output (or temporary file) is left behind.
    import pyarrow.parquet as pq

    frame = pl.DataFrame({"id": [f"p{i}" for i in range(3000)], "title": [f"red shirt no {i}" for i in range(3000)]})
    pq.write_table(frame.to_arrow(), tmp_path / "corrupt.parquet", row_group_size=1000, compression="none")
    data = bytearray((tmp_path / "corrupt.parquet").read_bytes())
    middle = len(data) * 2 // 3
    data[middle:middle + 4000] = b"\xff" * 4000
    (tmp_path / "corrupt.parquet").write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"corrupt.parquet: "):
        tagger.tag_file(tmp_path / "corrupt.parquet", tmp_path / "out.parquet", batch_size=500, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.parquet"]


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
    assert out["id"].to_list() == [f"c{i}" for i in range(len(TITLES))] and (out["labels"].list.len() == 0).all()
    summary = tagger.tag_file(catalog, tmp_path / "out.csv", top_k=3, min_score=0.0, progress=False)
    assert summary.without_labels == 0


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
            assert output.read_text() == "id,rank,label,label_text,score,bundle_id,bundle\n"
        report = evaluate_predictions(output, tmp_path / "t.parquet")
        assert report.rows == 2 and report.rows_without_predictions == 2 and report.metrics["P@1"] == 0.0
        assert report.notes == ["2 truth rows had no predictions (scored 0)"]


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


def test_a_directory_as_catalog_says_so(tagger, tmp_path):
    with pytest.raises(UserError, match=rf"{tmp_path}: is a directory, not a Parquet file"):
        tagger.tag_file(tmp_path, tmp_path / "out.parquet", progress=False)
