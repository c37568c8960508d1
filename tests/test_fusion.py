"""Image fusion end to end: train -> export -> tag on a small synthetic catalog with images, parity of the fused ONNX
graph, batch invariance, broken/missing images counted, the image cache reused.

The vision model is the tiny random CLIP and the text model the tiny BERT of conftest.py. Images are
noisy solid squares in the product's colour, as inline bytes or relative paths; every tenth row has none, a missing
file or bytes that are no picture.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import polars as pl
import pytest
import torch
from conftest import encoded, make_catalog
from typer.testing import CliRunner

from xmctag import Config, Tagger, UserError, export, run_dir, train
from xmctag import bundle as layout
from xmctag.backend.runtime import create_session
from xmctag.models.embedding import encode_ids, encode_texts
from xmctag.models.fusion import FusedEncoder
from xmctag.models.image_inputs import ImageInputs
from xmctag.models.tokens import pad, pad_id_of, token_ids
from xmctag.vision.registry import DEFAULT_VISION_ENCODER

RGB = {"red": (220, 20, 20), "blue": (20, 20, 220), "green": (20, 200, 20), "black": (0, 0, 0),
       "white": (255, 255, 255), "yellow": (240, 240, 0), "pink": (255, 150, 200), "grey": (128, 128, 128)}


def square(colour: str, seed: int) -> bytes:
    from PIL import Image

    noise = np.random.default_rng(seed).integers(-20, 20, (20, 20, 3))
    return encoded(Image.fromarray(np.clip(np.array(RGB[colour]) + noise, 0, 255).astype(np.uint8)))


def with_images(frame: pl.DataFrame, seed: int, directory) -> pl.DataFrame:
    """Adds a Binary ``image`` column (relative paths go in a second catalog, see ``catalog_with_paths``)."""
    values = []
    for i, labels in enumerate(frame["labels"].to_list()):
        colour = labels[0].split(":")[1]
        values.append({3: None, 7: b"\x89PNG not a picture"}.get(i % 10, square(colour, seed * 1000 + i)))
    return frame.with_columns(pl.Series("image", values, dtype=pl.Binary))


@pytest.fixture(scope="module")
def image_catalog(tmp_path_factory):
    out = tmp_path_factory.mktemp("image-catalog")
    for name, n, seed in (("train", 120, 1), ("dev", 40, 2)):
        with_images(make_catalog(n, seed), seed, out).write_parquet(out / f"{name}.parquet")
    # A catalog to tag whose images are files named relative to it (one missing), plus inline bytes.
    (out / "img").mkdir()
    frame = make_catalog(30, 3)
    paths = []
    for i, labels in enumerate(frame["labels"].to_list()):
        (out / "img" / f"{i}.png").write_bytes(square(labels[0].split(":")[1], 3000 + i))
        paths.append("img/missing.png" if i % 10 == 5 else f"img/{i}.png")
    frame.with_columns(pl.Series("image", paths)).write_parquet(out / "tag.parquet")
    from conftest import make_labels

    make_labels().write_parquet(out / "labels.parquet")
    return out


@pytest.fixture(scope="module")
def fused_run(tmp_path_factory, image_catalog, tiny_encoder_dir, tiny_models):
    out = tmp_path_factory.mktemp("fused-runs") / "run"
    config = Config(encoder=tiny_encoder_dir, vision=str(tiny_models["clip"]), epochs=1, classifier_epochs=1,
                    batch_size=32, lr=1e-3,
                    warmup_steps=2, max_length=16, label_max_length=12, cluster_size=8, label_vector_epochs=2)
    train(image_catalog / "train.parquet", image_catalog / "labels.parquet", out, dev=image_catalog / "dev.parquet",
          config=config, progress=False)
    return out


@pytest.fixture(scope="module")
def fused_bundle(fused_run, tmp_path_factory):
    return export(fused_run, tmp_path_factory.mktemp("fused-export") / "bundle", progress=False)


def run_images(run, catalog) -> ImageInputs:
    """The image inputs of a catalog's rows, read from the run's cache."""
    from xmctag.vision.embed import ImageFeatures

    fusion = run_dir.load_fusion(run)
    reader = ImageFeatures(fusion["cache_dir"], fusion["model_id"], fusion["dim"], catalog.parent)
    return ImageInputs(*reader.batch(pl.read_parquet(catalog)["image"].to_list()))


# -- config and data ---------------------------------------------------------------------------------------------
def test_vision_auto_none_and_explicit(image_catalog, catalog_dir):
    from xmctag.training.settings import resolve_vision

    assert resolve_vision(Config(), image_catalog / "train.parquet").vision == DEFAULT_VISION_ENCODER
    assert resolve_vision(Config(), catalog_dir / "train.parquet").vision == "none"  # no image column: text only
    assert resolve_vision(Config(vision="none"), image_catalog / "train.parquet").vision == "none"
    with pytest.raises(UserError, match="needs the image column"):
        resolve_vision(Config(vision="some/model"), catalog_dir / "train.parquet")
    with pytest.raises(UserError, match="max_images"):
        Config(max_images=0).validate()
    assert Config().image_lr == 5e-4 and Config().image_cache_dir is None


def test_labelled_set_keeps_image_values_aligned_with_rows(image_catalog):
    from xmctag.io.datasets import LabelTable, load_labelled_set

    config = Config()
    labels = LabelTable.load(image_catalog / "labels.parquet", config)
    data = load_labelled_set(image_catalog / "train.parquet", config, labels)
    assert len(data.images) == len(data) == 120 and data.images[3] is None and isinstance(data.images[0], bytes)
    assert load_labelled_set(image_catalog / "train.parquet", Config(vision="none"), labels).images is None
    assert labels.images is None  # this label table has no image column


# -- training ----------------------------------------------------------------------------------------------------
def test_fused_run_holds_projection_fusion_info_and_image_counts(fused_run, tiny_models):
    from safetensors.torch import load_file

    fusion = run_dir.load_fusion(fused_run)
    assert fusion["dim"] == 16 and fusion["max_images"] == 1 and fusion["image_col"] == "image"
    assert fusion["cache_dir"] == str((fused_run / "image_cache").resolve())  # default: inside the run
    counts = fusion["images"]["train"]
    assert counts["products"] == 120 and counts["failures"] == {"undecodable": 12}
    assert counts["with_image"] == 96 and counts["newly_embedded"] == 96
    weights = load_file(fused_run / run_dir.PROJECTION)
    assert weights["weight"].shape == (32, 16) and weights["bias"].shape == (32,)
    encoder, _ = run_dir.load_run(fused_run).encoder_and_tokenizer()
    assert isinstance(encoder, FusedEncoder)
    torch.testing.assert_close(encoder.image_projection.weight.detach(), weights["weight"])
    assert json.loads((fused_run / run_dir.CONFIG).read_text())["vision"] == str(tiny_models["clip"])
    assert "Image fusion" in (fused_run / run_dir.CARD).read_text()


def test_projection_has_its_own_learning_rate(tiny_encoder_dir):
    from xmctag.models.registry import load_pretrained

    _, backbone = load_pretrained(tiny_encoder_dir)
    encoder = FusedEncoder(backbone, vision_dim=16)
    groups = encoder.param_groups(Config(lr=1e-3, image_lr=7e-4))
    assert [g["lr"] for g in groups] == [1e-3, 7e-4]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in encoder.image_projection.parameters()}
    assert not {id(p) for p in groups[0]["params"]} & {id(p) for p in groups[1]["params"]}


def test_embedding_does_not_depend_on_batch_or_padding(fused_run, image_catalog):
    encoder, tokenizer = run_dir.load_run(fused_run).encoder_and_tokenizer()
    frame = pl.read_parquet(image_catalog / "dev.parquet").head(12)
    images = run_images(fused_run, image_catalog / "dev.parquet").take(np.arange(12))
    assert 0 < images.has_image.sum() < 12  # rows with and without an image
    texts = frame["title"].to_list()
    texts[1] = texts[1] + " with a much longer title than all the others in this batch"
    ids = token_ids(tokenizer, texts, 16)
    alone = np.vstack([encode_ids(encoder, [ids[i]], pad_id_of(tokenizer), images=images.take([i]))
                       for i in range(len(ids))])
    for batch_size in (3, 64):
        together = encode_ids(encoder, ids, pad_id_of(tokenizer), batch_size=batch_size, images=images)
        np.testing.assert_allclose(together, alone, atol=1e-5)
    # A product without an image is encoded exactly as text only; one with an image is not.
    text_only = encode_ids(encoder, ids, pad_id_of(tokenizer))
    np.testing.assert_allclose(alone[~images.has_image], text_only[~images.has_image], atol=1e-5)
    assert np.abs(alone[images.has_image] - text_only[images.has_image]).max() > 1e-3


@pytest.mark.e2e
def test_second_run_with_a_shared_cache_embeds_nothing_new(image_catalog, tiny_encoder_dir, tiny_models,
                                                           tmp_path):
    config = Config(encoder=tiny_encoder_dir, vision=str(tiny_models["clip"]), epochs=0, max_length=16,
                    label_max_length=12, label_vector_epochs=1, knn_neighbours=0,
                    image_cache_dir=str(tmp_path / "cache"))
    for name in ("first", "second"):
        train(image_catalog / "dev.parquet", image_catalog / "labels.parquet", tmp_path / name, config=config,
              progress=False)
    first, second = (run_dir.load_fusion(tmp_path / n)["images"]["train"] for n in ("first", "second"))
    assert first["newly_embedded"] == first["ok"] > 0 and first["cached"] == 0
    assert second["newly_embedded"] == 0 and second["cached"] == second["ok"] == first["ok"]
    assert not (tmp_path / "first" / "image_cache").exists()


# -- export --------------------------------------------------------------------------------------------------------
def test_fused_bundle_manifest_and_vision_graph(fused_bundle, fused_run):
    manifest = json.loads((fused_bundle / layout.MANIFEST).read_text())
    assert manifest["graph"]["inputs"] == ["input_ids", "attention_mask", "image_embedding", "image_mask"]
    fusion = manifest["fusion"]
    assert (fusion["vision_dim"], fusion["max_images"], fusion["image_col"]) == (16, 1, "image")
    assert fusion["model_id"] == run_dir.load_fusion(fused_run)["model_id"]
    assert fusion["vision_graph"]["files"] == ["vision.onnx"] and "fp32 only" in fusion["vision_graph"]["precision"]
    assert not (fused_bundle / "vision.fp16.onnx").exists()
    assert "vision.onnx" in manifest["files"] and "vision.json" in manifest["files"]


def test_bundle_vision_graph_reproduces_the_pytorch_vision_model(fused_bundle, fused_run, image_catalog):
    # Measured here with onnxruntime on the tagging catalog's pictures, not read from export's own check (the text
    # graph: test_fused_onnx_matches_pytorch_with_and_without_images).
    import onnxruntime as ort
    from PIL import Image

    from xmctag.vision.encoders import load_vision_encoder

    clip = load_vision_encoder(run_dir.load_fusion(fused_run)["vision"])
    pictures = [Image.open(path).convert("RGB") for path in sorted((image_catalog / "img").glob("*.png"))[:8]]
    session = ort.InferenceSession(str(fused_bundle / "vision.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(["image_embedding"], {"pixel_values": clip.preprocess(pictures).numpy()})[0]
    expected = clip.embed(pictures)
    assert got.shape == expected.shape == (8, 16)
    unit = np.linalg.norm(expected, axis=1, keepdims=True)
    assert np.abs(got / unit - expected / unit).max() <= 1e-5  # measured ~1e-7 on the tiny CLIP


@pytest.mark.parametrize("graph,tolerance", [(layout.ONNX_FP32, 1e-4), (layout.ONNX_FP16, 5e-3)])
def test_fused_onnx_matches_pytorch_with_and_without_images(fused_bundle, fused_run, image_catalog, graph,
                                                            tolerance):
    encoder, tokenizer = run_dir.load_run(fused_run).encoder_and_tokenizer()
    encoder.eval()
    session = create_session(fused_bundle / graph)
    frame = pl.read_parquet(image_catalog / "dev.parquet").head(10)
    images = run_images(fused_run, image_catalog / "dev.parquet").take(np.arange(10))
    assert 0 < images.has_image.sum() < 10
    ids, mask = pad(token_ids(tokenizer, frame["title"].to_list(), 16), pad_id_of(tokenizer))
    for rows in (np.arange(1), np.arange(10)):
        with torch.no_grad():
            expected = encoder(torch.from_numpy(ids[rows]), torch.from_numpy(mask[rows]),
                               **images.take(rows).tensors("cpu"))["embedding"].numpy()
        got = session.run(["embedding"], {"input_ids": ids[rows], "attention_mask": mask[rows],
                                          "image_embedding": images.features[rows],
                                          "image_mask": images.mask[rows].astype(np.int64)})[0]
        assert np.abs(got - expected).max() <= tolerance


# -- tagging -------------------------------------------------------------------------------------------------------
def test_tag_fused_bundle_counts_images_and_matches_pytorch(fused_bundle, fused_run, image_catalog, tmp_path):
    tagger = Tagger.load(fused_bundle, device="cpu")
    cache = tmp_path / "tag-cache"  # empty: every picture of the catalog is embedded with vision.onnx
    first = tagger.tag_file(image_catalog / "tag.parquet", tmp_path / "p1.parquet", top_k=3, batch_size=8,
                            progress=False, cache_dir=cache, workers=2)
    assert first.rows_tagged == 30 and first.image_cache == cache
    assert first.images == {"used": 27, "missing": 3, "failed": 0, "broken": 0, "cached": 0, "newly_embedded": 27,
                            "products_with_image": 27,
                            "examples": {"missing": f"row 5: {image_catalog / 'img/missing.png'}: missing"}}
    second = tagger.tag_file(image_catalog / "tag.parquet", tmp_path / "p2.parquet", top_k=3, batch_size=8,
                             progress=False, cache_dir=cache)
    assert (second.images["cached"], second.images["newly_embedded"]) == (27, 0)
    assert pl.read_parquet(tmp_path / "p1.parquet").equals(pl.read_parquet(tmp_path / "p2.parquet"))
    # The ONNX path (vision.onnx + fused graph) gives PyTorch's embeddings (features from the PyTorch CLIP).
    from xmctag.vision.encoders import load_vision_encoder

    encoder, tokenizer = run_dir.load_run(fused_run).encoder_and_tokenizer()
    frame = pl.read_parquet(image_catalog / "tag.parquet")
    clip = load_vision_encoder(run_dir.load_fusion(fused_run)["vision"])
    from PIL import Image

    features = np.zeros((30, 1, 16), np.float32)
    mask = np.zeros((30, 1), np.float32)
    for i, path in enumerate(frame["image"].to_list()):
        if "missing" not in path:
            features[i, 0] = clip.embed([Image.open(image_catalog / path).convert("RGB")])[0]
            mask[i, 0] = 1
    expected = encode_texts(encoder, tokenizer, frame["title"].to_list(), 16, images=ImageInputs(features, mask))
    images = tagger.images(cache).features(frame["image"].to_list(), image_catalog)
    np.testing.assert_allclose(tagger.embed(frame["title"].to_list(), images), expected, atol=1e-4)


def copy_with_its_own_cache(bundle, tmp_path):
    """A copy of a fused bundle whose manifest names a copy of the training run's image cache as its default
    cache (tagging writes to it), so that tagging with the default cache leaves the shared run as it was. The
    manifest is sealed again, as an export naming that cache would have sealed it."""
    import shutil

    from xmctag.manifest import seal

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / layout.MANIFEST).read_text())
    shutil.copytree(manifest["fusion"]["cache_dir"], tmp_path / "run-cache")
    manifest["fusion"]["cache_dir"] = str(tmp_path / "run-cache")
    seal(copy, manifest)
    return copy


def test_tag_with_broken_images_and_the_cli(fused_bundle, image_catalog, tmp_path):
    from xmctag.cli import app

    bundle = copy_with_its_own_cache(fused_bundle, tmp_path)
    result = CliRunner().invoke(app, ["tag", str(image_catalog / "dev.parquet"), "--model", str(bundle),
                                      "-o", str(tmp_path / "p.parquet"), "--quiet", "--workers", "2"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    # The bundle's cache (the run's) already holds the dev images: no new embedding, broken ones counted.
    output = " ".join(result.output.split())
    assert f"cache {tmp_path / 'run-cache'}" in output
    assert "images: 32 used (32 cached, 0 newly embedded), 0 missing, 0 failed, 4 broken" in output
    assert "images: 4 broken, e.g. row 7: <18 bytes>: undecodable" in output
    assert pl.read_parquet(tmp_path / "p.parquet").height == 40


def test_fused_tagging_never_imports_torch(fused_bundle, image_catalog, tmp_path):
    # New pictures are embedded with the bundle's vision.onnx, the products with its fused graph: no torch.
    import subprocess
    import sys
    from pathlib import Path

    code = """if True:
        import sys
        from xmctag import Tagger
        tagger = Tagger.load(sys.argv[1], device="cpu")
        summary = tagger.tag_file(sys.argv[2], sys.argv[3], top_k=3, progress=False, cache_dir=sys.argv[4])
        print(summary.rows_tagged, summary.images["newly_embedded"])
        print(sorted(m for m in sys.modules if m.split(".")[0] == "torch"))
    """
    done = subprocess.run([sys.executable, "-c", code, str(fused_bundle), str(image_catalog / "tag.parquet"),
                           str(tmp_path / "p.parquet"), str(tmp_path / "cache")], cwd=Path(__file__).parent.parent,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["30 27", "[]"], done.stdout  # tagged, pictures embedded, no torch


def test_cache_falls_back_next_to_the_output_when_the_bundle_cache_is_not_writable(tmp_path):
    from xmctag.vision.tagging import resolve_cache_dir

    blocked = tmp_path / "file-not-dir"
    blocked.write_text("x")
    assert resolve_cache_dir(None, str(blocked / "cache"), tmp_path / "o" / "p.parquet") == \
        tmp_path / "o" / "xmctag-image-cache"
    assert resolve_cache_dir(None, str(tmp_path / "ok"), tmp_path / "p.parquet") == tmp_path / "ok"
    assert resolve_cache_dir(tmp_path / "mine", str(tmp_path / "ok"), None) == tmp_path / "mine"


def test_tag_time_image_counts_tell_failures_apart_with_an_example(tmp_path, closed_port_urls):
    from xmctag.vision.tagging import BundleImages, summary_lines

    (tmp_path / "real.png").write_bytes(b"not a picture")
    url = closed_port_urls(1)[0]
    fusion = {"max_images": 1, "vision_dim": 16, "model_id": "test-model"}  # no picture to embed: no vision graph
    images = BundleImages(tmp_path, fusion, tmp_path / "cache", workers=2)
    images.options.retries = 0
    images.options.allowed_hosts = ("127.0.0.1",)  # the URL's loopback address
    _, mask = images.features(["nope.png", url, None, "real.png", "s3://b/x.png", url], tmp_path, row0=10)
    assert not mask.any()
    counts = images.counts.to_dict()
    assert (counts["missing"], counts["failed"], counts["broken"], counts["used"]) == (1, 2, 2, 0)
    examples = counts["examples"]
    assert examples["failed"].startswith(f"row 11: {url}: fetch_failed: ") and "refused" in examples["failed"]
    assert examples == {"missing": f"row 10: {tmp_path / 'nope.png'}: missing", "failed": examples["failed"],
                        "broken": f"row 13: {tmp_path / 'real.png'}: undecodable"}
    assert summary_lines(counts, "C") == [
        "images: 0 used (0 cached, 0 newly embedded), 1 missing, 2 failed, 2 broken; 0 products with an image; "
        "cache C", f"images: 1 missing, e.g. {examples['missing']}", f"images: 2 failed, e.g. {examples['failed']}",
        f"images: 2 broken, e.g. {examples['broken']}"]


@pytest.mark.e2e
def test_auto_vision_without_a_usable_training_image_trains_text_only(tmp_path, catalog_dir, tiny_encoder_dir,
                                                                      tiny_models, monkeypatch):
    import xmctag.training.settings as training_settings

    monkeypatch.setattr(training_settings, "DEFAULT_VISION_ENCODER", str(tiny_models["clip"]))  # "auto" picks it
    frame = pl.read_parquet(catalog_dir / "train.parquet").head(60)
    frame.with_columns(pl.Series("image", [f"img/{i}.png" for i in range(60)])).write_parquet(tmp_path / "t.parquet")
    files = dict(train=tmp_path / "t.parquet", labels=catalog_dir / "labels.parquet", progress=False)
    config = Config(encoder=tiny_encoder_dir, epochs=0, classifier_epochs=0, max_length=16, label_max_length=12,
                    label_vector_epochs=1, knn_neighbours=0)
    with pytest.warns(UserWarning, match=r"t.parquet: none of the 60 training products has a usable image in column "
                                         r"'image' \(e.g. row 0: .*img/0.png: missing\); training text only"):
        train(out=tmp_path / "run", config=config, **files)
    assert Config.load(tmp_path / "run" / run_dir.CONFIG).vision == "none"  # what export and tagging read
    assert run_dir.load_fusion(tmp_path / "run") is None
    encoder, _ = run_dir.load_run(tmp_path / "run").encoder_and_tokenizer()
    assert not isinstance(encoder, FusedEncoder)
    # A vision model named explicitly: an error, not a quiet text-only run.
    with pytest.raises(UserError, match="none of the 60 training products has a usable image .*--vision none"):
        train(out=tmp_path / "named", config=Config(**{**config.to_dict(), "vision": str(tiny_models["clip"])}),
              **files)


def test_text_only_bundle_has_no_image_path(trained_run):
    assert run_dir.load_fusion(trained_run) is None
    assert json.loads((trained_run / run_dir.CONFIG).read_text())["vision"] == "none"


def test_fused_decoder_puts_the_image_before_the_eos_and_is_batch_invariant(tmp_path_factory):
    """Decoders: the image prefix only on rows with an image; embeddings independent of batch and padding."""
    from test_decoder import SMALL, TEXTS, make_tokenizer
    from transformers import Qwen2Config, Qwen2Model

    from xmctag.models.build import prepare_model

    tokenizer = make_tokenizer(bos=False)
    torch.manual_seed(0)
    backbone = Qwen2Model(Qwen2Config(vocab_size=len(tokenizer), **SMALL))
    config = Config(pooling="last", lora_rank=0, max_images=2)
    tokenizer, encoder = prepare_model(tokenizer, backbone, config, torch.device("cpu"), vision_dim=16)
    assert isinstance(encoder, FusedEncoder) and tokenizer.template.image_tokens == 2
    rng = np.random.default_rng(0)
    mask = np.array([[1, 0], [0, 0], [1, 1], [0, 0], [1, 0], [0, 0], [1, 1]], np.float32)
    images = ImageInputs(rng.normal(size=(len(TEXTS), 2, 16)).astype(np.float32), mask)
    encoder.init_projection(images.features[images.mask > 0])
    ids = token_ids(tokenizer, TEXTS, 24, images.has_image)
    prefix = list(tokenizer.template.image_prefix_ids)
    assert ids[0][-len(prefix) - 1:-1] == prefix and ids[1][-len(prefix) - 1:-1] != prefix
    pad_id = pad_id_of(tokenizer)
    alone = np.vstack([encode_ids(encoder, [ids[i]], pad_id, images=images.take([i])) for i in range(len(ids))])
    np.testing.assert_allclose(encode_ids(encoder, ids, pad_id, batch_size=3, images=images), alone, atol=1e-5)
    np.testing.assert_allclose(encode_ids(encoder, ids, pad_id, images=images), alone, atol=1e-5)
    text_only = encode_ids(encoder, ids, pad_id)
    np.testing.assert_allclose(alone[~images.has_image], text_only[~images.has_image], atol=1e-5)


def test_catalog_without_the_image_column_is_tagged_text_only(fused_bundle, image_catalog, tmp_path):
    tagger = Tagger.load(fused_bundle, device="cpu")
    frame = pl.read_parquet(image_catalog / "tag.parquet")
    frame.drop("image").write_parquet(tmp_path / "no-column.parquet")
    frame.with_columns(pl.lit(None, dtype=pl.String).alias("image")).write_parquet(tmp_path / "null-images.parquet")
    with pytest.warns(UserWarning, match=r"no-column.parquet has no image column 'image': products are tagged from "
                                         r"text only"):
        summary = tagger.tag_file(tmp_path / "no-column.parquet", tmp_path / "a.parquet", top_k=3, progress=False,
                                  cache_dir=tmp_path / "cache")
    assert summary.rows_tagged == 30 and summary.images["used"] == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the column is there, only empty: counted as missing images, no warning
        tagger.tag_file(tmp_path / "null-images.parquet", tmp_path / "b.parquet", top_k=3, progress=False,
                        cache_dir=tmp_path / "cache")
    assert pl.read_parquet(tmp_path / "a.parquet").equals(pl.read_parquet(tmp_path / "b.parquet"))


@pytest.mark.e2e
def test_fused_decoder_trains_exports_with_parity_and_tags(image_catalog, tiny_models, tmp_path_factory):
    """The decoder path with the image token, end to end: LoRA run -> merged export with the image inputs -> fp32
    and fp16 parity with and without images -> tagging through ONNX Runtime."""
    from test_decoder import SMALL, make_tokenizer
    from transformers import Qwen2Config, Qwen2Model

    work = tmp_path_factory.mktemp("fused-decoder")
    tokenizer = make_tokenizer(bos=False)
    torch.manual_seed(0)
    Qwen2Model(Qwen2Config(vocab_size=len(tokenizer), **SMALL)).save_pretrained(work / "qwen2")
    tokenizer.save_pretrained(work / "qwen2")
    config = Config(encoder=str(work / "qwen2"), vision=str(tiny_models["clip"]), epochs=1, batch_size=32,
                    lora_rank=4, lora_lr=1e-3, warmup_steps=2, max_length=16, label_max_length=12, cluster_size=8,
                    label_vector_epochs=2)
    run = work / "run"
    train(image_catalog / "train.parquet", image_catalog / "labels.parquet", run, dev=image_catalog / "dev.parquet",
          config=config, progress=False)
    bundle = export(run, work / "bundle", progress=False)
    manifest = json.loads((bundle / layout.MANIFEST).read_text())
    assert manifest["graph"]["inputs"] == ["input_ids", "attention_mask", "image_embedding", "image_mask"]
    assert manifest["tokenization"]["prompt"] and manifest["fusion"]["vision_dim"] == 16

    encoder, tokenizer = run_dir.load_run(run).encoder_and_tokenizer()
    encoder.eval()
    assert encoder.is_decoder and isinstance(encoder, FusedEncoder)
    frame = pl.read_parquet(image_catalog / "dev.parquet").head(10)
    images = run_images(run, image_catalog / "dev.parquet").take(np.arange(10))
    assert 0 < images.has_image.sum() < 10
    ids, mask = pad(token_ids(tokenizer, frame["title"].to_list(), 16, images.has_image), pad_id_of(tokenizer))
    with torch.no_grad():
        expected = encoder(torch.from_numpy(ids), torch.from_numpy(mask), **images.tensors("cpu"))["embedding"].numpy()
    for graph, tolerance in ((layout.ONNX_FP32, 1e-4), (layout.ONNX_FP16, 5e-3)):
        got = create_session(bundle / graph).run(["embedding"], {
            "input_ids": ids, "attention_mask": mask, "image_embedding": images.features,
            "image_mask": images.mask.astype(np.int64)})[0]
        assert np.abs(got - expected).max() <= tolerance, graph

    tagger = Tagger.load(bundle, device="cpu")
    np.testing.assert_allclose(tagger.embed(frame["title"].to_list(), (images.features, images.mask)), expected,
                               atol=1e-4)
    summary = tagger.tag_file(image_catalog / "dev.parquet", work / "p.parquet", top_k=3, progress=False)
    assert summary.rows_tagged == 40 and summary.images["broken"] == 4


@pytest.mark.e2e
def test_two_images_per_product_train_export_and_tag(tmp_path, tiny_encoder_dir, tiny_models):
    """max_images 2 end to end: a list image column (relative paths; some products with one picture, a missing one
    or none) -> a run and a bundle with two image slots -> tagging that fills both and matches PyTorch."""
    from conftest import make_labels

    (tmp_path / "img").mkdir()

    def with_two_images(frame: pl.DataFrame, seed: int) -> pl.DataFrame:
        values = []
        for i, labels in enumerate(frame["labels"].to_list()):
            names = []
            for slot in range(2):
                name = f"img/{seed}-{i}-{slot}.png"
                (tmp_path / name).write_bytes(square(labels[0].split(":")[1], seed * 10_000 + 2 * i + slot))
                names.append(name)
            values.append({4: [], 5: names[:1], 6: [names[0], "img/missing.png"]}.get(i % 10, names))
        return frame.with_columns(pl.Series("image", values, dtype=pl.List(pl.String)))

    for name, n, seed in (("train", 120, 1), ("tag", 30, 3)):
        with_two_images(make_catalog(n, seed), seed).write_parquet(tmp_path / f"{name}.parquet")
    make_labels().write_parquet(tmp_path / "labels.parquet")
    config = Config(encoder=tiny_encoder_dir, vision=str(tiny_models["clip"]), max_images=2, epochs=1,
                    classifier_epochs=0, batch_size=32, lr=1e-3, warmup_steps=2, max_length=16, label_max_length=12,
                    cluster_size=8, label_vector_epochs=2)
    train(tmp_path / "train.parquet", tmp_path / "labels.parquet", tmp_path / "run", config=config, progress=False)
    fusion = run_dir.load_fusion(tmp_path / "run")
    assert fusion["max_images"] == 2
    counts = fusion["images"]["train"]
    assert (counts["products"], counts["with_image"]) == (120, 108)  # all but the 12 with an empty list
    bundle = export(tmp_path / "run", tmp_path / "bundle", progress=False)
    assert json.loads((bundle / layout.MANIFEST).read_text())["fusion"]["max_images"] == 2

    tagger = Tagger.load(bundle, device="cpu")
    summary = tagger.tag_file(tmp_path / "tag.parquet", tmp_path / "p.parquet", top_k=3, progress=False,
                              cache_dir=tmp_path / "tag-cache")
    # 30 products: 3 without a picture, 3 with one, 3 with one and a missing one, 21 with two.
    assert summary.rows_tagged == 30
    assert (summary.images["used"], summary.images["missing"], summary.images["products_with_image"]) == (
        3 + 3 + 2 * 21, 3, 27)
    assert pl.read_parquet(tmp_path / "p.parquet")["labels"].list.len().to_list() == [3] * 30

    # Both slots reach the graph, as in PyTorch; the second picture changes the embedding.
    frame = pl.read_parquet(tmp_path / "tag.parquet")
    features, mask = tagger.images(tmp_path / "tag-cache").features(frame["image"].to_list(), tmp_path)
    assert features.shape == (30, 2, 16) and mask.sum(axis=0).tolist() == [27, 21]
    encoder, tokenizer = run_dir.load_run(tmp_path / "run").encoder_and_tokenizer()
    titles = frame["title"].to_list()
    expected = encode_texts(encoder, tokenizer, titles, 16, images=ImageInputs(features, mask.astype(np.float32)))
    np.testing.assert_allclose(tagger.embed(titles, (features, mask)), expected, atol=1e-4)
    first_only = mask.copy()
    first_only[:, 1] = 0
    two = mask[:, 1] > 0
    assert np.abs(tagger.embed(titles, (features, first_only))[two] - expected[two]).max() > 1e-3


def test_an_incremental_night_rehashes_image_references_not_pictures(fused_bundle, image_catalog, tmp_path):
    import shutil

    from xmctag.io.predictions import read_prediction_products

    shutil.copytree(image_catalog / "img", tmp_path / "img")  # the shared catalog stays as it is
    frame = pl.read_parquet(image_catalog / "tag.parquet")
    frame.write_parquet(tmp_path / "night1.parquet")
    tagger = Tagger.load(fused_bundle, device="cpu")
    options = {"top_k": 3, "progress": False, "cache_dir": tmp_path / "cache", "batch_size": 8}
    tagger.tag_file(tmp_path / "night1.parquet", tmp_path / "n1.parquet", **options)
    # Night 2: product 1 points at another picture, product 2 has a new title; product 0's picture changes under
    # the same path (not detected: the path is hashed, not the file behind it).
    paths = frame["image"].to_list()
    paths[1] = "img/0.png"
    night2 = frame.with_columns(pl.Series("image", paths),
                                title=pl.when(pl.int_range(pl.len()) == 2).then(pl.col("title") + " new")
                                .otherwise(pl.col("title")))
    night2.write_parquet(tmp_path / "night2.parquet")
    (tmp_path / "img" / "0.png").write_bytes(square("green", 99))
    summary = tagger.tag_file(tmp_path / "night2.parquet", tmp_path / "n2.parquet", previous=tmp_path / "n1.parquet",
                              **options)
    assert {k: summary.incremental[k] for k in ("reused", "retagged", "new", "dropped")} == \
        {"reused": 28, "retagged": 2, "new": 0, "dropped": 0}
    assert summary.images["used"] + summary.images["missing"] == 2  # only the re-tagged products' images were read
    full = tagger.tag_file(tmp_path / "night2.parquet", tmp_path / "full.parquet", **options)
    got, expected = (read_prediction_products(tmp_path / f"{n}.parquet") for n in ("n2", "full"))
    assert got["content_hash"].to_list() == expected["content_hash"].to_list()
    assert got["labels"][1:].to_list() == expected["labels"][1:].to_list()
    night1 = read_prediction_products(tmp_path / "n1.parquet")
    assert got["scores"][0].to_list() == night1["scores"][0].to_list()  # product 0: last night's, as documented
    assert full.rows_tagged == summary.rows_tagged == 30


def test_relabel_keeps_a_fused_bundle_working(fused_bundle, image_catalog, tmp_path):
    # xmctag relabel on an image bundle: its label side is embedded as training embedded it (text only: the label
    # table has no images), and the relabelled bundle tags with images, without the retired label, with the new one.
    from conftest import make_labels

    from xmctag.relabeller import embed_label_texts, relabel

    source = layout.Bundle.open(fused_bundle)
    texts = source.labels(["encoder_text"], optional=())["encoder_text"].to_list()
    np.testing.assert_allclose(embed_label_texts(source, texts), source.label_embeddings(), atol=1e-4)
    labels = pl.concat([make_labels().filter(pl.col("label") != "colour:red"),
                        pl.DataFrame({"label": ["colour:purple"], "text": ["colour: purple"], "alt_texts": [[]]},
                                     schema=make_labels().schema)])
    labels.write_parquet(tmp_path / "labels.parquet")
    report = relabel(fused_bundle, tmp_path / "labels.parquet", tmp_path / "new", progress=False)
    assert (report.kept, report.added, report.retired) == (18, 1, 1)
    tagger = Tagger.load(tmp_path / "new", device="cpu")
    summary = tagger.tag_file(image_catalog / "tag.parquet", tmp_path / "p.parquet", top_k=19, progress=False,
                              cache_dir=tmp_path / "cache")  # not the shared run's cache
    assert summary.rows_tagged == 30 and summary.images["used"] > 0
    seen = set(pl.read_parquet(tmp_path / "p.parquet")["labels"].explode().to_list())
    assert "colour:red" not in seen and "colour:purple" in seen
