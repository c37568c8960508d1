"""vision/onnx_export and onnx_runtime: vision graphs in fp32 and fp16 checked against PyTorch, run without torch,
exported lazily with a fallback, and no file left behind by a parity violation."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from conftest import encoded, picture

from xmctag.errors import UserError
from xmctag.vision.embed import embed_images


def test_onnx_export_tiny_clip_fp32_and_fp16(tmp_path, clip_encoder):
    import onnxruntime as ort

    from xmctag.vision.onnx_export import export_vision_onnx

    parity = export_vision_onnx(clip_encoder, tmp_path)
    print("tiny CLIP parity", parity)
    assert parity["vision.onnx"]["normalised"] <= 1e-4 and parity["vision.fp16.onnx"]["normalised"] <= 5e-3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vision.fp16.onnx", "vision.json", "vision.onnx"]
    session = ort.InferenceSession(str(tmp_path / "vision.onnx"), providers=["CPUExecutionProvider"])
    pics = [picture(i) for i in range(3)]
    got = session.run(["image_embedding"], {"pixel_values": clip_encoder.preprocess(pics).numpy()})[0]
    np.testing.assert_allclose(got, clip_encoder.embed(pics), atol=1e-4)


def test_onnx_vision_encoder_runs_without_torch_and_shares_the_cache(tmp_path, clip_encoder):
    from xmctag.vision.onnx_export import export_vision_onnx
    from xmctag.vision.onnx_runtime import OnnxVisionEncoder

    export_vision_onnx(clip_encoder, tmp_path / "export")
    onnx_encoder = OnnxVisionEncoder(tmp_path / "export")
    assert (onnx_encoder.model_id, onnx_encoder.dim, onnx_encoder.image_size) == (
        clip_encoder.model_id, clip_encoder.dim, clip_encoder.image_size)
    assert OnnxVisionEncoder(tmp_path / "export", fp16=True).model_id == clip_encoder.model_id + "+fp16"
    pics = [picture(i, (40 + i, 30)) for i in range(3)]
    np.testing.assert_allclose(onnx_encoder.embed(pics, batch_size=2), clip_encoder.embed(pics), atol=1e-4)
    pl.DataFrame({"image": [encoded(p) for p in pics]}).write_parquet(tmp_path / "c.parquet")
    assert embed_images(tmp_path / "c.parquet", encoder=clip_encoder, cache_dir=tmp_path / "cache").newly_embedded == 3
    again = embed_images(tmp_path / "c.parquet", encoder=onnx_encoder, cache_dir=tmp_path / "cache")
    assert (again.cache_hits, again.newly_embedded) == (3, 0)
    with pytest.raises(UserError, match="vision.json"):
        OnnxVisionEncoder(tmp_path)


def test_exported_encoder_embeds_like_torch_exporting_lazily_and_falls_back(clip_encoder, monkeypatch):
    import xmctag.vision.onnx_export as onnx_export

    fast = onnx_export.ExportedVisionEncoder(clip_encoder)
    assert (fast.model_id, fast.dim) == (clip_encoder.model_id, clip_encoder.dim)  # shares the cache
    assert fast.runtime is None  # nothing exported until a picture needs embedding
    pics = [picture(i, (40 + i, 30)) for i in range(5)]
    np.testing.assert_allclose(fast.embed(pics, batch_size=2), clip_encoder.embed(pics), atol=1e-4)
    assert fast.runtime == "onnxruntime"

    def broken_export(*args, **kwargs):
        raise RuntimeError("no such op")

    monkeypatch.setattr(onnx_export, "export_vision_onnx", broken_export)
    fallback = onnx_export.ExportedVisionEncoder(clip_encoder)
    with pytest.warns(UserWarning, match="embedding images with PyTorch, not ONNX Runtime .RuntimeError: no such op"):
        features = fallback.embed(pics)
    assert fallback.runtime == "torch"
    np.testing.assert_array_equal(features, clip_encoder.embed(pics))


def test_onnx_export_parity_violation_raises_and_writes_nothing(tmp_path, clip_encoder):
    from xmctag.vision.onnx_export import ParityError, export_vision_onnx

    with pytest.raises(ParityError, match="parity"):
        export_vision_onnx(clip_encoder, tmp_path, fp16=True, fp16_tolerance=0.0)
    assert list(tmp_path.iterdir()) == []


def test_onnx_export_efficientnet_lite0(tmp_path, effnet):
    from xmctag.vision.onnx_export import export_vision_onnx

    # fp16 is measured, not held to 5e-3: EfficientNet-Lite0's fp16 graph is off by ~7e-3 (see the report).
    parity = export_vision_onnx(effnet, tmp_path, fp16=True, pictures=[picture(i, (64, 48)) for i in range(3)],
                                fp16_tolerance=0.05)
    print("EfficientNet-Lite0 parity", parity)
    assert parity["vision.onnx"]["normalised"] <= 1e-4 and parity["vision.onnx"]["raw"] <= 1e-3
    assert parity["vision.fp16.onnx"]["normalised"] <= 0.02
    assert (tmp_path / "vision.onnx").stat().st_size > 10_000_000
