"""Shared fixtures: a tiny random BERT with the real MiniLM tokenizer, and a small synthetic catalog.

The catalog is learnable: each product title names a colour, an article type and a brand, and its labels are the
colour and the article type (label texts "colour: red", "article: shirt", ...).

Session fixtures build each expensive artefact once (one training of the tiny run, one export of it, the tiny vision
models) and are shared read-only: a test that changes one of them fails (``shared_fixtures_stay_unchanged``); a test
that needs to change one works on a copy (``copy_of``). Tests that train a model, or need a trained one, are marked
``e2e`` (``pytest -m "not e2e"`` runs the fast unit tests alone).
"""

from __future__ import annotations

import copy
import io
import os
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from xmctag import Tagger

# One OpenMP thread for torch (and faiss) unless the caller sets OMP_NUM_THREADS: the test models are tiny, and with
# two threads on a busy 2-core machine each step waits for the other thread's core (the training tests ran 10x
# slower: 184 s against 16 s for test_training + test_config_and_data). torch is already imported here (pytest's
# filterwarnings setting names torch.jit.TracerWarning), so it is told directly; the variable is for the libraries
# loaded later and for subprocesses.
if "OMP_NUM_THREADS" not in os.environ:
    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

COLOURS = ["red", "blue", "green", "black", "white", "yellow", "pink", "grey"]
ARTICLES = ["shirt", "jeans", "shoes", "watch", "bag", "dress", "jacket", "socks", "cap", "belt"]
BRANDS = ["acme", "zeta", "nova", "orbit", "lumen"]


def make_catalog(n: int, seed: int) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        colour, article, brand = rng.choice(COLOURS), rng.choice(ARTICLES), rng.choice(BRANDS)
        rows.append({"id": f"p{seed}-{i}", "title": f"{brand} {colour} {article}",
                     "labels": [f"colour:{colour}", f"article:{article}"]})
    return pl.DataFrame(rows, schema={"id": pl.String, "title": pl.String, "labels": pl.List(pl.String)})


def make_labels() -> pl.DataFrame:
    labels = [f"colour:{c}" for c in COLOURS] + [f"article:{a}" for a in ARTICLES] + ["article:umbrella"]
    texts = [x.replace(":", ": ") for x in labels]
    alt = [["colour " + x.split(":")[1] + " tone"] if x.startswith("colour") else [] for x in labels]
    return pl.DataFrame({"label": labels, "text": texts, "alt_texts": alt})


@pytest.fixture(scope="session")
def minilm_tokenizer_dir() -> str:
    from xmctag.models.registry import resolve_model_path

    return resolve_model_path("builtin:minilm-l6")


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory, minilm_tokenizer_dir) -> str:
    """A 2-layer, 32-wide random BERT saved with the real MiniLM tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    out = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(minilm_tokenizer_dir)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def catalog_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("catalog")
    make_catalog(400, seed=1).write_parquet(out / "train.parquet")
    make_catalog(80, seed=2).write_parquet(out / "dev.parquet")
    make_labels().write_parquet(out / "labels.parquet")
    return out


@pytest.fixture(scope="session")
def small_catalog_dir(tmp_path_factory) -> Path:
    """The catalog at a third of the size (128 training rows, 40 dev rows, the same labels): for tests that train
    several runs to compare them, where the size of the data does not matter."""
    out = tmp_path_factory.mktemp("small-catalog")
    make_catalog(128, seed=1).write_parquet(out / "train.parquet")
    make_catalog(40, seed=2).write_parquet(out / "dev.parquet")
    make_labels().write_parquet(out / "labels.parquet")
    return out


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, catalog_dir, tiny_encoder_dir) -> Path:
    """A run trained on the synthetic catalog (shared by export/tag tests)."""
    from xmctag import Config, train

    out = tmp_path_factory.mktemp("runs") / "tiny"
    config = Config(encoder=tiny_encoder_dir, epochs=2, classifier_epochs=1, batch_size=32, lr=1e-3, warmup_steps=5,
                    max_length=16,
                    label_max_length=12, cluster_size=8, label_vector_epochs=10)
    train(catalog_dir / "train.parquet", catalog_dir / "labels.parquet", out, dev=catalog_dir / "dev.parquet",
          config=config, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_bundle(trained_run, tmp_path_factory) -> Path:
    """The one export of ``trained_run`` (fp32, fp16 and int8 graphs), shared read-only by export, tagging and CLI
    tests. Change a copy (``copy_of``), never this."""
    from xmctag import export

    return export(trained_run, tmp_path_factory.mktemp("export") / "tiny", progress=False)


TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=8)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random checkpoints with image processor configs: full CLIP, SigLIP vision tower, SigLIP2 NaFlex tower."""
    import torch
    import transformers as tf

    root = tmp_path_factory.mktemp("vision-models")
    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99)
    clip = tf.CLIPConfig(text_config=text, vision_config=dict(TINY_VISION, image_size=32), projection_dim=16)
    tf.CLIPModel(clip).save_pretrained(root / "clip")
    tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        root / "clip")
    tf.SiglipVisionModel(tf.SiglipVisionConfig(**TINY_VISION, image_size=32)).save_pretrained(root / "siglip")
    tf.SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "siglip")
    tf.Siglip2VisionModel(tf.Siglip2VisionConfig(**TINY_VISION, num_patches=16)).save_pretrained(root / "siglip2")
    tf.Siglip2ImageProcessor(patch_size=8, max_num_patches=16).save_pretrained(root / "siglip2")
    return {name: root / name for name in ("clip", "siglip", "siglip2")}


@pytest.fixture()
def closed_port_urls(monkeypatch):
    """``closed_port_urls(n)``: URLs on 127.0.0.1 where nothing listens, so each fetch fails at once with
    "connection refused". The port stays bound (never listening) until the test ends: no other process on the
    machine can start answering on it meanwhile."""
    import socket

    for name in ("NO_PROXY", "no_proxy"):  # a proxy configured on the machine must not see 127.0.0.1
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    port = held.getsockname()[1]
    yield lambda n: [f"http://127.0.0.1:{port}/{i}.jpg" for i in range(n)]
    held.close()


# -- the tiny bundle loaded for tagging -----------------------------------------------------------------------------
@pytest.fixture()
def bundle(tiny_bundle):
    """The shared export of the tiny run (read-only: change a copy_of it)."""
    return tiny_bundle


@pytest.fixture(scope="session")
def loaded(tiny_bundle):
    """The shared bundle loaded once per session (Tagger.load takes ~0.3 s, most of it the runtime package check);
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


def write_catalog(path: Path, titles: list[str | None], ids: list[str | None] | None = None) -> Path:
    """A Parquet catalog of ``id`` and ``title`` (ids p0, p1, ... unless given), both String even when all null."""
    ids = ids if ids is not None else [f"p{i}" for i in range(len(titles))]
    pl.DataFrame({"id": ids, "title": titles}, schema={"id": pl.String, "title": pl.String}).write_parquet(path)
    return path


# -- pictures, vision encoders and an image server -----------------------------------------------------------------
def picture(seed: int, size=(24, 18)):
    """A PIL picture of random pixels, the same for the same seed."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def encoded(pic, fmt: str = "PNG") -> bytes:
    """The picture as image-file bytes."""
    buffer = io.BytesIO()
    pic.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def clip_encoder(tiny_models):
    from xmctag.vision.encoders import load_vision_encoder

    return load_vision_encoder(str(tiny_models["clip"]))


@pytest.fixture(scope="session")
def effnet():
    from xmctag.vision.encoders import load_vision_encoder

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
    """An ``ImageServer`` on 127.0.0.1 for one test (test_fetch_security has a server of its own)."""
    for name in ("NO_PROXY", "no_proxy"):  # a proxy configured on the machine must not see 127.0.0.1
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    s = ImageServer()
    yield s
    s.close()


# -- shared artefacts stay as they were built ------------------------------------------------------------------------
# Fixtures whose directory tests share (session or module scope); a test may read them, never change them.
READ_ONLY_FIXTURES = ("catalog_dir", "small_catalog_dir", "tiny_encoder_dir", "trained_run", "tiny_bundle",
                      "tiny_models", "fused_run", "fused_bundle", "image_catalog", "dev_predictions", "decoder_run",
                      "decoder_bundle")


def _snapshot(path: Path) -> dict[str, tuple[int, int]]:
    """Every file and directory under ``path`` with its size and modification time."""
    path = Path(path)
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in [path, *path.rglob("*")]}


@pytest.fixture(autouse=True)
def shared_fixtures_stay_unchanged(request):
    """Fails a test that wrote into a shared fixture's directory (a side effect later tests would see)."""
    shared = {}
    for name in READ_ONLY_FIXTURES:
        if name in request.fixturenames:
            value = request.getfixturevalue(name)
            for path in (value.values() if isinstance(value, dict) else [value]):
                shared[f"{name} {path}"] = _snapshot(path)
    yield
    changed = [name for name, before in shared.items() if _snapshot(name.split(" ", 1)[1]) != before]
    assert not changed, f"the test changed the shared fixture(s) {changed}; work on a copy (copy_of)"


def pytest_collection_modifyitems(items):
    """``e2e``: every test that needs a trained model (through a fixture that trains one) or the whole pipeline.
    Tests that train one themselves carry the marker explicitly."""
    trains = {"trained_run", "tiny_bundle", "fused_run", "fused_bundle", "decoder_run", "decoder_bundle",
              "dev_predictions"}
    for item in items:
        if trains & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


# -- the one place tests reach inside the package (module paths move: update them here) -----------------------------
@pytest.fixture()
def writer_spy(monkeypatch):
    """Records the rows of each batch the prediction writer appends (``spy.rows``, one entry per append, and
    ``spy.events``, shared with whatever else a test records); ``spy.interrupt_at = n`` raises KeyboardInterrupt in
    place of the n-th append (1-based), as a Ctrl-C in the middle of tagging would."""
    from types import SimpleNamespace

    from xmctag.io.writers import PredictionWriter

    spy = SimpleNamespace(rows=[], events=[], interrupt_at=None)
    write = PredictionWriter.write_frame

    def recording(self, products, *args, **kwargs):
        if spy.interrupt_at is not None and len(spy.rows) + 1 >= spy.interrupt_at:
            raise KeyboardInterrupt
        spy.rows.append(len(products))
        spy.events.append(("write", len(products)))
        return write(self, products, *args, **kwargs)

    monkeypatch.setattr(PredictionWriter, "write_frame", recording)
    return spy


def stop_after_checkpoint(monkeypatch, stage: str, epoch: int | None = None) -> None:
    """Training raises KeyboardInterrupt right after writing its checkpoint of ``stage`` ("dual encoder" or
    "classifier"; at ``epoch`` of that stage when given, else its first), as an interruption between two epochs
    would. Use inside ``monkeypatch.context()`` so the resumed run is not stopped again."""
    from xmctag import run_dir

    save = run_dir.save_checkpoint

    def save_then_stop(out, state):
        save(out, state)
        done = state["classifier" if state["stage"] == "classifier" else "dual_encoder"]["done"]
        if state["stage"] == stage and (epoch is None or done == epoch):
            raise KeyboardInterrupt

    monkeypatch.setattr(run_dir, "save_checkpoint", save_then_stop)


def count_training_steps(monkeypatch) -> list:
    """A list that gets one entry per optimisation step of the dual-encoder stage from now on."""
    from xmctag.training.dual_encoder import DualEncoderStage

    steps = []
    step = DualEncoderStage.train_step
    monkeypatch.setattr(DualEncoderStage, "train_step",
                        lambda *args, **kwargs: steps.append(1) or step(*args, **kwargs))
    return steps


@pytest.fixture(scope="session")
def sys_is_unwritable() -> bool:
    """Whether files cannot be created in /sys (true on most machines, even as root): the real unwritable output
    directory the bad-output tests use."""
    import os
    import tempfile

    try:
        fd, name = tempfile.mkstemp(dir="/sys")
    except OSError:
        return True
    os.close(fd)
    os.unlink(name)
    return False


@pytest.fixture()
def copy_of(tmp_path):
    def copy(path: Path) -> Path:
        target = tmp_path / Path(path).name
        shutil.copytree(path, target)
        return target

    return copy
