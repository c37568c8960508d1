"""Export: Optimum ONNX graphs, parity with PyTorch, the bundle and its manifest."""

import json

import numpy as np
import polars as pl
import pytest
import torch

from xmctag import UserError, export, run_dir
from xmctag import bundle as layout
from xmctag.backend.runtime import create_session
from xmctag.models.tokens import pad, pad_id_of, token_ids


@pytest.fixture()
def bundle_dir(tiny_bundle):
    """The shared export of the tiny run (read-only: change a copy_of it)."""
    return tiny_bundle


def test_bundle_contents_and_manifest(bundle_dir):
    manifest = json.loads((bundle_dir / layout.MANIFEST).read_text())
    assert manifest["graph"]["inputs"] == ["input_ids", "attention_mask"]
    assert manifest["graph"]["files"] == [layout.ONNX_FP32, layout.ONNX_FP16, layout.ONNX_INT8]
    assert manifest["dims"] == {"embedding": 32, "index": 33, "labels": 19, "neighbours": 400}
    assert (bundle_dir / layout.NEIGHBOUR_INDEX).exists() and manifest["scoring"]["knn_neighbours"] == 20
    assert set(manifest["parity_max_abs"]) == {"rows", layout.ONNX_FP32, layout.ONNX_FP16, layout.ONNX_INT8,
                                               f"{layout.ONNX_INT8} min cosine"}
    for name in (run_dir.LABEL_VECTORS, "tokenizer/tokenizer.json", run_dir.LABELS, run_dir.CONFIG):
        assert name in manifest["files"]
    assert layout.INDEX not in manifest["files"]  # exact label search: label_vectors.npy, once
    assert {entry["kind"] for entry in manifest["index"].values()} == {"exact"}
    layout.read_manifest(bundle_dir)  # hashes verify
    assert layout.is_bundle(bundle_dir)  # what export --overwrite may replace


def measured_parity(bundle, run, texts) -> dict[str, tuple[float, float]]:
    """(max abs difference, min cosine) of each ONNX graph of ``bundle`` against the run's PyTorch encoder on
    ``texts``: onnxruntime and the Hugging Face tokenizer directly, nothing of export's own check."""
    import onnxruntime as ort

    encoder, tokenizer = run_dir.load_run(run).encoder_and_tokenizer()
    encoder.eval()
    batch = tokenizer(texts, max_length=16, truncation=True, padding=True, return_tensors="np")
    ids, mask = batch["input_ids"].astype(np.int64), batch["attention_mask"].astype(np.int64)
    with torch.no_grad():
        expected = encoder(torch.from_numpy(ids), torch.from_numpy(mask))["embedding"].numpy()
    measured = {}
    for graph in json.loads((bundle / layout.MANIFEST).read_text())["graph"]["files"]:
        session = ort.InferenceSession(str(bundle / graph), providers=["CPUExecutionProvider"])
        got = session.run(["embedding"], {"input_ids": ids, "attention_mask": mask})[0].astype(np.float32)
        cosine = (got * expected).sum(axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
        measured[graph] = float(np.abs(got - expected).max()), float(cosine.min())
    return measured


def test_each_graph_reproduces_pytorch_on_catalog_and_label_texts(bundle_dir, trained_run, catalog_dir):
    texts = (pl.read_parquet(catalog_dir / "dev.parquet")["title"].to_list()
             + pl.read_parquet(catalog_dir / "labels.parquet")["text"].to_list()
             + ["a much longer product title about blue jeans and a belt, truncated at sixteen tokens here"])
    measured = measured_parity(bundle_dir, trained_run, texts)
    print("parity (max abs, min cosine):", measured)
    fp32, fp16, int8 = (measured[g] for g in (layout.ONNX_FP32, layout.ONNX_FP16, layout.ONNX_INT8))
    # Measured on this tiny model (max abs, min cosine): fp32 (2e-7, 1 - 1e-7): float rounding of the fused kernels;
    # fp16 (7e-4, 1 - 1e-6); int8 (8e-3, 0.9998). The bounds leave room for other CPUs, far below export's own bars
    # (1e-4 and 5e-3 max abs, int8 cosine 0.95).
    assert fp32[0] <= 1e-6 and fp32[1] >= 1 - 1e-6
    assert fp16[0] <= 2e-3 and fp16[1] >= 0.9999
    assert int8[0] <= 0.03 and int8[1] >= 0.99
    # The manifest reports what export measured on its own rows (sampled products, label texts): the same order.
    recorded = json.loads((bundle_dir / layout.MANIFEST).read_text())["parity_max_abs"]
    for graph, (worst, _) in ((layout.ONNX_FP32, fp32), (layout.ONNX_FP16, fp16), (layout.ONNX_INT8, int8)):
        assert worst / 10 <= recorded[graph] <= worst * 10, (graph, recorded[graph], worst)
    assert recorded[f"{layout.ONNX_INT8} min cosine"] >= 0.99


@pytest.mark.parametrize("graph,tolerance", [(layout.ONNX_FP32, 1e-4), (layout.ONNX_FP16, 5e-3)])
def test_onnx_matches_pytorch_with_dynamic_batch_and_length(bundle_dir, trained_run, graph, tolerance):
    run = run_dir.load_run(trained_run)
    encoder, tokenizer = run.encoder_and_tokenizer()
    encoder.eval()
    session = create_session(bundle_dir / graph)
    texts = ["acme red shirt", "a much longer product title about blue jeans and a belt", "cap"]
    for batch in (texts[:1], texts):
        ids, mask = pad(token_ids(tokenizer, batch, 16), pad_id_of(tokenizer))
        with torch.no_grad():
            expected = encoder(torch.from_numpy(ids), torch.from_numpy(mask))["embedding"].numpy()
        got = session.run(["embedding"], {"input_ids": ids, "attention_mask": mask})[0]
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= tolerance
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=tolerance)


def test_export_refuses_a_non_empty_target_and_a_non_run(trained_run, bundle_dir, tmp_path):
    with pytest.raises(UserError, match="not empty"):
        export(trained_run, bundle_dir, progress=False)
    with pytest.raises(UserError, match="not a finished xmctag run"):
        export(tmp_path, tmp_path / "out", progress=False)


def test_export_overwrite_replaces_only_a_bundle(tmp_path):
    # Checked before the run is read: none of these needs a trained run.
    out = tmp_path / "runs"
    (out / "tiny").mkdir(parents=True)
    (out / "tiny" / run_dir.CONFIG).write_text("{}")
    with pytest.raises(UserError, match=f"--out {out}: holds the run {out / 'tiny'}"):
        export(out / "tiny", out, overwrite=True, progress=False)
    with pytest.raises(UserError, match="holds the run"):
        export(out / "tiny", out / "tiny", overwrite=True, progress=False)
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=f"--out {home}: not an xmctag bundle"):
        export(out / "tiny", home, overwrite=True, progress=False)
    assert (home / "notes.txt").exists() and (out / "tiny" / run_dir.CONFIG).exists()
    # A bundle holds its manifest and the files it names, nothing else.
    bundle = tmp_path / "bundle"
    (bundle / layout.TOKENIZER).mkdir(parents=True)
    (bundle / layout.MANIFEST).write_text(json.dumps({"format": layout.FORMAT, "files": {
        layout.ONNX_FP32: "x", f"{layout.TOKENIZER}/tokenizer.json": "y"}}))
    (bundle / layout.ONNX_FP32).write_text("graph")
    assert layout.is_bundle(bundle)
    (bundle / "notes.txt").write_text("mine")
    assert not layout.is_bundle(bundle)


def test_modified_bundle_is_refused(bundle_dir, copy_of):
    copy = copy_of(bundle_dir)
    with open(copy / run_dir.LABEL_VECTORS, "ab") as f:
        f.write(b"x")
    with pytest.raises(UserError, match="does not match the manifest"):
        layout.read_manifest(copy)


def test_export_overwrites_a_bundle_without_passing_on_onnx_runtime_noise(trained_run, bundle_dir, copy_of,
                                                                           caplog):
    # ONNX Runtime's optimizer and quantiser log "There is no gpu for onnxruntime to do optimization." (as an error)
    # and "Please consider to run pre-processing before quantization" on every CPU export: noise in a nightly log.
    old = copy_of(bundle_dir)
    (old / layout.MANIFEST).write_text(json.dumps({**layout.read_manifest(old), "bundle_id": "0" * 16}))
    assert export(trained_run, old, overwrite=True, progress=False) == old
    messages = " ".join(record.getMessage() for record in caplog.records)
    assert "no gpu" not in messages and "pre-processing" not in messages
    manifest = layout.read_manifest(old)  # a whole new bundle: its hashes verify
    assert manifest["bundle_id"] != "0" * 16 and sorted(manifest["files"]) == sorted(
        layout.read_manifest(bundle_dir)["files"])
    assert sorted(p.name for p in old.parent.iterdir()) == [old.name]  # no staging directory left


def test_export_fails_loudly_past_the_parity_bar_and_writes_nothing(trained_run, tmp_path, monkeypatch):
    from xmctag.backend import parity

    monkeypatch.setattr(parity, "FP32_TOLERANCE", 1e-12)  # no real graph matches PyTorch this closely
    with pytest.raises(UserError, match=r"parity check: encoder.onnx differs from PyTorch by .* no bundle written"):
        export(trained_run, tmp_path / "bundle", fp16=False, progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the bundle nor its staging directory


def test_export_without_fp16_has_no_fp16_graph(trained_run, tmp_path):
    bundle = export(trained_run, tmp_path / "bundle", fp16=False, progress=False)
    manifest = json.loads((bundle / layout.MANIFEST).read_text())
    assert layout.ONNX_FP16 not in manifest["graph"]["files"] and not (bundle / layout.ONNX_FP16).exists()
    assert layout.ONNX_FP16 not in manifest["parity_max_abs"]
