"""Export: Optimum ONNX graphs, parity with PyTorch, the bundle and its manifest."""

import json

import numpy as np
import pytest
import torch

from xmctag import UserError, export, run_dir
from xmctag import bundle as layout
from xmctag.backend.runtime import create_session
from xmctag.models.tokens import pad, pad_id_of, token_ids


def test_bundle_contents_and_manifest(bundle_dir):
    manifest = json.loads((bundle_dir / layout.MANIFEST).read_text())
    assert manifest["graph"]["inputs"] == ["input_ids", "attention_mask"]
    assert manifest["graph"]["files"] == [layout.ONNX_FP32, layout.ONNX_FP16, layout.ONNX_INT8]
    assert manifest["parity_max_abs"][f"{layout.ONNX_INT8} min cosine"] >= 0.95
    assert manifest["dims"] == {"embedding": 32, "index": 33, "labels": 19, "neighbours": 400}
    assert (bundle_dir / layout.NEIGHBOUR_INDEX).exists() and manifest["scoring"]["knn_neighbours"] == 20
    assert manifest["parity_max_abs"][layout.ONNX_FP32] <= 1e-4
    assert manifest["parity_max_abs"][layout.ONNX_FP16] <= 5e-3
    for name in (layout.INDEX, "tokenizer/tokenizer.json", run_dir.LABELS, run_dir.CONFIG):
        assert name in manifest["files"]
    layout.read_manifest(bundle_dir)  # hashes verify
    assert layout.is_bundle(bundle_dir)  # what export --overwrite may replace


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


def test_export_does_not_pass_on_onnx_runtime_noise(trained_run, tmp_path, caplog):
    # ONNX Runtime's optimizer and quantiser log "There is no gpu for onnxruntime to do optimization." (as an error)
    # and "Please consider to run pre-processing before quantization" on every CPU export: noise in a nightly log.
    export(trained_run, tmp_path / "quiet", progress=False)
    messages = " ".join(record.getMessage() for record in caplog.records)
    assert "no gpu" not in messages and "pre-processing" not in messages


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
