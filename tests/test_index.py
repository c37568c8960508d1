"""The bundle's searches (``xmctag.backend.index``): exact below ``exact_below`` rows, IVF above it with nprobe tuned
to the recall floor on real rows (exact with a warning when it cannot), the ``index`` manifest section checked and
covered by the bundle id, each array stored once, and bundles from before the section still tagging.

Real faiss indexes, real exports of the tiny run; a run with 3,000 labels is the tiny run's 19 trained labels plus
synthetic ones (random mixtures of them plus noise), so its label index is large enough to be worth approximating."""

import json
import shutil
import warnings

import numpy as np
import polars as pl
import pytest
from conftest import make_catalog
from typer.testing import CliRunner

import xmctag
from xmctag import Tagger, UserError, export, run_dir
from xmctag import bundle as layout
from xmctag import manifest as manifest_file
from xmctag.backend import index as searches
from xmctag.bundle import Bundle
from xmctag.cli import app


def titles() -> list[str]:
    return make_catalog(60, seed=5)["title"].to_list()


def reseal(bundle, change) -> dict:
    manifest = json.loads((bundle / layout.MANIFEST).read_text())
    change(manifest)
    return manifest_file.seal(bundle, manifest)


def synthetic_run(run, out, n_labels: int, seed: int = 0):
    """A copy of ``run`` with ``n_labels`` labels: its own, then mixtures of 3 of them plus noise."""
    shutil.copytree(run, out)
    shutil.rmtree(out / run_dir.LEXICAL, ignore_errors=True)  # its trees know the 19 labels only
    rng = np.random.default_rng(seed)
    vectors, embeddings = np.load(out / run_dir.LABEL_VECTORS), np.load(out / run_dir.LABEL_EMBEDDINGS)
    extra = n_labels - len(vectors)
    picks, weights = rng.integers(0, len(vectors), (extra, 3)), rng.dirichlet(np.ones(3), extra)[:, :, None]

    def mixed(matrix):
        noise = 0.3 * matrix.std(axis=0) * rng.standard_normal((extra, matrix.shape[1]))
        return np.vstack([matrix, (weights * matrix[picks]).sum(axis=1) + noise]).astype(np.float32)

    embeddings = mixed(embeddings)
    np.save(out / run_dir.LABEL_VECTORS, mixed(vectors))
    np.save(out / run_dir.LABEL_EMBEDDINGS, embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True))
    table = pl.read_parquet(out / run_dir.LABELS)
    names = [f"synthetic:{i}" for i in range(extra)]
    added = pl.DataFrame({"label": names, "text": names, "encoder_text": names, "train_count": [0] * extra})
    pl.concat([table, added.select([c for c in table.columns if c in added.columns])], how="diagonal_relaxed") \
        .select(table.columns).write_parquet(out / run_dir.LABELS)
    return out


@pytest.fixture(scope="module")
def auto_bundle(trained_run, tmp_path_factory):
    """``--index auto --exact-below 100``: the 19 labels exact, the 400 training products IVF."""
    return export(trained_run, tmp_path_factory.mktemp("ann") / "auto", fp16=False, progress=False, exact_below=100)


@pytest.fixture(scope="module")
def wide_run(trained_run, tmp_path_factory):
    return synthetic_run(trained_run, tmp_path_factory.mktemp("ann") / "wide", 3000)


@pytest.fixture(scope="module")
def ivf_bundle(wide_run, tmp_path_factory):
    return export(wide_run, tmp_path_factory.mktemp("ann") / "ivf", fp16=False, progress=False, index="ivf")


def test_auto_is_exact_below_the_threshold_and_ivf_above(auto_bundle):
    manifest = Bundle.open(auto_bundle).manifest
    labels, neighbours = manifest["index"]["labels"], manifest["index"]["neighbours"]
    assert labels == {"kind": "exact", "requested": "auto", "rows": 19, "exact_below": 100, "floor": 0.98,
                      "queries": 0, "recall": None, "fallback": None}
    assert neighbours["kind"] == "ivf" and neighbours["rows"] == 400 and neighbours["storage"] == "fp16"
    assert neighbours["nlist"] == searches.nlist_for(400) == 10 and 1 <= neighbours["nprobe"] <= 10
    assert neighbours["queries"] == 400 and neighbours["recall"]["neighbours@20"] >= 0.98
    # Each array once: no labels.faiss beside label_vectors.npy, the training embeddings only in neighbours.faiss.
    top = {name.split("/")[0] for name in manifest["files"]}
    assert top == {layout.ONNX_FP32, layout.ONNX_INT8, layout.TOKENIZER, run_dir.LABELS, run_dir.LABEL_EMBEDDINGS,
                   run_dir.LABEL_VECTORS, layout.NEIGHBOUR_INDEX, run_dir.TRAIN_LABELS, run_dir.TRAIN_IDS,
                   run_dir.CONFIG, run_dir.CARD} | ({run_dir.LEXICAL} if "lexical" in manifest else set())


def test_exact_search_gives_the_flat_index_results(tiny_bundle):
    import faiss

    vectors = Bundle.open(tiny_bundle).label_vectors()
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(np.asarray(vectors))
    queries = np.random.default_rng(0).standard_normal((300, vectors.shape[1])).astype(np.float32)
    for k in (1, 5, 19, 25):  # 25 > 19 rows: padded with -1, as faiss pads
        got, expected = searches.ExactSearch(vectors).search(queries, k), flat.search(queries, k)
        np.testing.assert_array_equal(got[1], expected[1])
        np.testing.assert_allclose(got[0][:, :19], expected[0][:, :19], rtol=1e-6, atol=1e-6)
    # A bundle exported with --index exact (the tiny bundle: auto, below the threshold) tags as the flat index did.
    tagger = Tagger.load(tiny_bundle, device="cpu")
    assert isinstance(tagger.index, searches.ExactSearch)
    new = tagger.predict(titles(), top_k=5)
    tagger.index = flat  # what tagging searched before: labels.faiss, an IndexFlatIP
    old = tagger.predict(titles(), top_k=5)
    np.testing.assert_array_equal(new[0], old[0])
    np.testing.assert_allclose(new[1], old[1], atol=1e-6)


def test_an_approximate_bundle_reaches_its_recorded_recall(ivf_bundle, wide_run, tiny_bundle):
    bundle = Bundle.open(ivf_bundle)
    entry = bundle.index_entry("labels")
    assert entry["kind"] == "ivf" and entry["rows"] == 3000 and entry["storage"] == "sq8" and entry["refine"] == 2
    assert (layout.INDEX in bundle.manifest["files"]) and entry["queries"] == 400
    # The recorded recall, measured again through what tagging loads, on the same real rows.
    sample, rows = searches.query_sample(np.load(wide_run / run_dir.TRAIN_EMBEDDINGS))
    vectors = bundle.label_vectors()
    search = bundle.label_index()
    assert isinstance(search, searches.RefinedSearch) and search.index.nprobe == entry["nprobe"]
    recall = searches.label_recall(sample, vectors, bundle.manifest["scoring"]["scale"],
                                   searches.ExactSearch(vectors), search)
    assert recall == entry["recall"] and min(recall.values()) >= entry["floor"] == 0.98
    neighbours = bundle.index_entry("neighbours")
    exact = searches.ExactSearch(np.load(wide_run / run_dir.TRAIN_EMBEDDINGS))
    assert searches.neighbour_recall(sample, rows, exact, bundle.neighbours()[0], 20) == neighbours["recall"]
    # Tagging new products: the approximate bundle's top 5 against the same bundle searched exactly.
    tagger = Tagger.load(ivf_bundle, device="cpu")
    approx = tagger.predict(titles(), top_k=5)
    tagger.index = searches.ExactSearch(vectors)
    tagger.neighbour_index = exact
    exact_top = tagger.predict(titles(), top_k=5)
    assert searches.overlap(approx[0], exact_top[0]) >= 0.95


def test_a_floor_that_cannot_be_met_falls_back_to_exact_with_a_warning(trained_run, tiny_bundle, tmp_path):
    with pytest.warns(UserWarning, match=r"neighbour index: ivf .* below the floor 1.0: exact search instead"):
        export(trained_run, tmp_path / "b", fp16=False, progress=False, index="ivf", recall_floor=1.0, max_nprobe=1)
    bundle = Bundle.open(tmp_path / "b")
    neighbours = bundle.index_entry("neighbours")
    assert neighbours["kind"] == "exact" and neighbours["requested"] == "ivf" and "nprobe" not in neighbours
    assert neighbours["recall"]["neighbours@20"] < 1.0 and "below the floor" in neighbours["fallback"]
    import faiss

    assert isinstance(bundle.neighbours()[0], faiss.IndexFlatIP)
    # 19 labels: one cell, every label found, candidates re-scored exactly: the recall floor of 1.0 is met.
    assert bundle.index_entry("labels")["kind"] == "ivf" and bundle.index_entry("labels")["nlist"] == 1
    new = Tagger.load(tmp_path / "b", device="cpu").predict(titles(), top_k=5)
    old = Tagger.load(tiny_bundle, device="cpu").predict(titles(), top_k=5)
    np.testing.assert_array_equal(new[0], old[0])
    np.testing.assert_allclose(new[1], old[1], atol=1e-6)


def test_the_index_section_is_covered_by_the_bundle_id(auto_bundle, copy_of):
    copy = copy_of(auto_bundle)
    nprobe = Bundle.open(copy).index_entry("neighbours")["nprobe"]
    other = 1 if nprobe != 1 else 2
    manifest = json.loads((copy / layout.MANIFEST).read_text())
    manifest["index"]["neighbours"]["nprobe"] = other
    (copy / layout.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="the manifest was modified after export"):
        Bundle.open(copy)
    sealed = reseal(copy, lambda m: m["index"]["neighbours"].update(nprobe=other))
    assert sealed["bundle_id"] != Bundle.open(auto_bundle).bundle_id
    assert Tagger.load(copy, device="cpu").neighbour_index.nprobe == other  # the tagger searches as recorded


@pytest.mark.parametrize("key,value,match", [
    ("neighbours.nprobe", 0, "invalid key 'index.neighbours.nprobe'"),
    ("neighbours.nprobe", 11, "invalid key 'index.neighbours.nprobe'"),  # more than its 10 cells
    ("neighbours.kind", "hnsw", "invalid key 'index.neighbours.kind'"),
    ("neighbours.storage", "pq", "invalid key 'index.neighbours.storage'"),
    ("labels.floor", 1.5, "invalid key 'index.labels.floor'"),
    ("labels.recall", {"top@5": "high"}, "invalid key 'index.labels.recall'"),
    ("labels", "fast", "invalid key 'index.labels'"),
    ("extra", {}, "invalid key 'index.extra'"),
    ("neighbours.nlist", 9, "neighbours.faiss .* does not match the manifest"),
    ("labels.kind", "ivf", r"invalid key 'index.labels.(recall|nlist)'"),
])
def test_a_nonsense_index_section_is_a_one_line_error(auto_bundle, copy_of, key, value, match):
    copy = copy_of(auto_bundle)

    def change(manifest):
        section, (*parents, last) = manifest["index"], key.split(".")
        for parent in parents:
            section = section[parent]
        section[last] = value

    reseal(copy, change)
    with pytest.raises(UserError, match=match) as caught:
        Tagger.load(copy, device="cpu")
    assert "\n" not in str(caught.value)


def test_a_damaged_approximate_index_is_a_one_line_error(ivf_bundle, copy_of):
    copy = copy_of(ivf_bundle)
    data = (copy / layout.INDEX).read_bytes()
    (copy / layout.INDEX).write_bytes(data[: len(data) // 2])
    reseal(copy, lambda m: None)
    with pytest.raises(UserError, match=r"bundle file labels.faiss is unreadable .*re-export the bundle$"):
        Tagger.load(copy, device="cpu")


def test_a_bundle_from_before_the_index_section_still_tags(tiny_bundle, copy_of):
    import faiss

    copy = copy_of(tiny_bundle)
    flat = faiss.IndexFlatIP(Bundle.open(copy).dims["index"])
    flat.add(np.load(copy / run_dir.LABEL_VECTORS))
    faiss.write_index(flat, str(copy / layout.INDEX))
    reseal(copy, lambda m: m.pop("index"))  # the layout of bundles exported before 2026-12-03
    tagger = Tagger.load(copy, device="cpu")
    assert isinstance(tagger.index, faiss.IndexFlatIP)
    old, new = tagger.predict(titles(), top_k=5), Tagger.load(tiny_bundle, device="cpu").predict(titles(), top_k=5)
    np.testing.assert_array_equal(old[0], new[0])
    np.testing.assert_allclose(old[1], new[1], atol=1e-6)
    (copy / layout.INDEX).unlink()
    reseal(copy, lambda m: None)
    with pytest.raises(UserError, match="labels.faiss is not in the manifest's files"):
        Tagger.load(copy, device="cpu")


def test_relabel_rebuilds_an_approximate_label_index(ivf_bundle, tmp_path):
    # 500 labels retired, 2 added: their votes come from the training products of the IVF neighbour index.
    table = pl.concat([pl.read_parquet(ivf_bundle / run_dir.LABELS).select("label", "text").head(2500),
                       pl.DataFrame({"label": ["colour:purple", "article:scarf"],
                                     "text": ["colour: purple", "article: scarf"]})])
    table.write_parquet(tmp_path / "labels.parquet")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the recall floor is met again: no fallback
        xmctag.relabel(ivf_bundle, tmp_path / "labels.parquet", tmp_path / "fewer", progress=False)
    bundle = Bundle.open(tmp_path / "fewer")
    entry = bundle.index_entry("labels")
    assert entry["kind"] == "ivf" and entry["rows"] == 2502 and min(entry["recall"].values()) >= entry["floor"]
    assert bundle.label_index().ntotal == 2502 and bundle.index_entry("neighbours")["kind"] == "ivf"
    assert bundle.index_entry("neighbours") == Bundle.open(ivf_bundle).index_entry("neighbours")
    assert bundle.manifest["relabel"]["votes"]["pairs"] > 0
    top, _ = Tagger.load(tmp_path / "fewer", device="cpu").predict(titles(), top_k=5)
    assert top.max() < 2502


def test_export_index_options(trained_run, tmp_path):
    import inspect

    from xmctag import cli

    for args, match in ((["--index", "hnsw"], "--index must be one of auto, exact, ivf"),
                        (["--recall-floor", "1.5"], "--recall-floor must be in (0, 1]")):
        result = CliRunner().invoke(app, ["export", str(trained_run), "--out", str(tmp_path / "x"), *args])
        assert result.exit_code == 2 and match in " ".join(result.output.split()), result.output
        assert not (tmp_path / "x").exists()
    defaults = {name: p.default.default for name, p in inspect.signature(cli.export).parameters.items()}
    assert (defaults["index"], defaults["exact_below"]) == ("auto", None)
    assert defaults["recall_floor"] == searches.RECALL_FLOOR
    assert (searches.EXACT_BELOW, searches.NEIGHBOUR_EXACT_BELOW) == (50_000, 20_000)  # the README's figures


def test_the_gpu_label_search_graph_matches_exact_search_on_the_cpu_provider(ivf_bundle, wide_run):
    # The ONNX Runtime graph tagging on CUDA uses (fp16 matrix product + TopK, backend/gpu_search.py), run on the
    # CPU provider: with its candidates re-scored exactly, the exact search's candidates and logits.
    from xmctag.backend.gpu_search import OnnxTopK

    vectors = Bundle.open(ivf_bundle).label_vectors()
    queries, _ = searches.query_sample(np.load(wide_run / run_dir.TRAIN_EMBEDDINGS))
    q1 = np.hstack([queries, np.ones((len(queries), 1), np.float32)])
    onnx = OnnxTopK(vectors, "cpu")
    raw, exact = onnx.search(q1, 32), searches.ExactSearch(vectors).search(q1, 32)
    np.testing.assert_allclose(raw[0], exact[0], rtol=1e-2, atol=1e-2)  # fp16 scores
    logits, top = searches.RefinedSearch(onnx, vectors, searches.REFINE).search(q1, 32)
    assert searches.overlap(top, exact[1]) >= 0.999
    same = top == exact[1]
    np.testing.assert_allclose(logits[same], exact[0][same], rtol=1e-5, atol=1e-5)
    padded = onnx.search(q1[:3], 3005)  # more than its 3,000 rows: -1, as faiss pads
    assert (padded[1][:, 3000:] == -1).all() and (np.sort(padded[1][:, :3000], axis=1) == np.arange(3000)).all()
