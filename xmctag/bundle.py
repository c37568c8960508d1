"""Layout of a model bundle (what ``xmctag export`` writes and ``xmctag tag`` reads).

    encoder.onnx           fp32 graph for CPU: input_ids, attention_mask [, image_embedding, image_mask] -> embedding
    encoder.fp16.onnx      the same graph with fp16 weights, for CUDA (optional)
    encoder.int8.onnx      the fp32 graph with int8 weights (dynamic quantisation): faster on CPU, approximate
    tokenizer/             tokenizer files (tokenizer.json is what tagging uses)
    labels.parquet         label, text, encoder_text, exclusive_group, train_count
    label_embeddings.npy   (L, d) label-text embeddings
    label_vectors.npy      (L, d + 1) rows [w_l, b_l]
    labels.faiss           faiss inner-product index over label_vectors (queries are [embedding, 1])
    neighbours.faiss       faiss inner-product index over the training products' embeddings (kNN votes; optional)
    train_labels.npz       the training products' label indices (CSR), row i of neighbours.faiss -> its labels
    vision.onnx            image fusion only: the frozen vision encoder, pixel_values -> image_embedding (fp32 only)
    vision.json            image fusion only: its model id, dim and preprocessing (xmctag.vision.onnx_runtime)
    config.json            the training Config
    manifest.json          bundle id, file hashes, versions, dims, tokenisation settings, parity results
    README.md              model card of the run
"""

from __future__ import annotations

import datetime
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from xmctag import run_dir
from xmctag.errors import UserError

FORMAT = "xmctag-bundle/1"
ONNX_FP32 = "encoder.onnx"
ONNX_FP16 = "encoder.fp16.onnx"
ONNX_INT8 = "encoder.int8.onnx"
TOKENIZER = "tokenizer"
INDEX = "labels.faiss"
NEIGHBOUR_INDEX = "neighbours.faiss"
MANIFEST = "manifest.json"
VISION_FP32 = "vision.onnx"
VISION_META = "vision.json"
IMAGE_INPUTS = ("image_embedding", "image_mask")
COPIED_FROM_RUN = (run_dir.CONFIG, run_dir.LABELS, run_dir.LABEL_EMBEDDINGS, run_dir.LABEL_VECTORS, run_dir.CARD)


def is_bundle(path: Path) -> bool:
    """Whether the directory ``path`` holds an xmctag bundle and nothing else: a manifest naming every entry."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or not str(manifest.get("format", "")).startswith("xmctag-bundle/"):
        return False
    names = {name.split("/")[0] for name in manifest.get("files", {})} | {MANIFEST}
    return {entry.name for entry in path.iterdir()} <= names


def parity_texts(trained: run_dir.TrainedRun, n: int = 128) -> list[str]:
    """Real rows for the export parity check: sampled training products, then label texts."""
    sample = run_dir.load_sample_texts(trained.path)
    labels = trained.labels.texts[:: max(1, len(trained.labels) // n)]
    return (sample + labels)[:n]


def write_bundle_files(target: Path, trained: run_dir.TrainedRun, parity: dict, pad_id: int,
                       prompt: dict | None = None, fusion: dict | None = None) -> None:
    """Everything but the ONNX graphs and tokenizer (already in ``target``): labels, index, config, manifest.

    ``prompt``: a decoder's ``PromptTemplate.to_dict()``, stored as ``tokenization.prompt`` (the tagger then builds
    ``prefix ids + title ids[:budget] + eos`` from it instead of using the tokenizer's special tokens).
    ``fusion``: the run's ``fusion.json`` (image fusion): stored as the manifest's ``fusion`` section, with the
    vision graph's files; the text graph then has the ``image_embedding`` and ``image_mask`` inputs.
    """
    from xmctag.backend import runtime

    faiss = runtime.faiss()
    for name in COPIED_FROM_RUN:
        shutil.copy2(trained.path / name, target / name)
    vectors = trained.vectors.index_matrix()
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    faiss.write_index(index, str(target / INDEX))
    neighbours = run_dir.load_neighbours(trained.path)
    n_neighbours = 0
    if neighbours is not None:
        embeddings, labels = neighbours
        neighbour_index = faiss.IndexFlatIP(embeddings.shape[1])
        neighbour_index.add(np.ascontiguousarray(embeddings, dtype=np.float32))
        faiss.write_index(neighbour_index, str(target / NEIGHBOUR_INDEX))
        shutil.copy2(trained.path / run_dir.TRAIN_LABELS, target / run_dir.TRAIN_LABELS)
        n_neighbours = len(labels)
    files = sorted(p for p in target.rglob("*") if p.is_file())
    hashes = {str(p.relative_to(target)): _sha256(p) for p in files}
    config = trained.config
    manifest = {
        "format": FORMAT,
        "bundle_id": hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()[:16],
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source_run": str(trained.path.resolve()),
        "versions": _versions(),
        "dims": {"embedding": int(vectors.shape[1] - 1), "index": int(vectors.shape[1]), "labels": len(vectors),
                 "neighbours": n_neighbours},
        "graph": {"inputs": ["input_ids", "attention_mask"] + (list(IMAGE_INPUTS) if fusion else []),
                  "outputs": ["embedding"],
                  "files": [n for n in (ONNX_FP32, ONNX_FP16, ONNX_INT8) if (target / n).exists()]},
        "tokenization": {"tokenizer": f"{TOKENIZER}/tokenizer.json", "max_length": config.max_length, "pad_id": pad_id,
                         "text_cols": config.text_cols, "separator": " ; ", "padding": "right", "truncation": True},
        "training": {"rows": trained.n_train, "encoder": config.encoder},
        "scoring": {"score": "(1 - knn_weight) * sigmoid(scale * <[embedding, 1], label vector>) + knn_weight * "
                             "neighbour vote (see xmctag/scoring.py)",
                    "scale": trained.vectors.scale,
                    "knn_neighbours": config.knn_neighbours if n_neighbours else 0,
                    "knn_temperature": config.knn_temperature,
                    "knn_weight": config.knn_weight if n_neighbours else 0.0},
        "parity_max_abs": parity,
        "files": hashes,
    }
    if prompt is not None:
        manifest["tokenization"]["prompt"] = prompt
    if fusion is not None:
        manifest["fusion"] = fusion_manifest(fusion, decoder=prompt is not None)
    (target / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def fusion_manifest(fusion: dict, decoder: bool) -> dict:
    """The manifest's ``fusion`` section: what the tagger needs to build the image inputs (see ``xmctag.tagger``)."""
    return {
        "vision": fusion["vision"], "model_id": fusion["model_id"], "vision_dim": fusion["dim"],
        "image_col": fusion["image_col"], "max_images": fusion["max_images"],
        "cache_dir": fusion["cache_dir"],  # the training run's image cache: tagging's default
        "image_token": "after the text, before the EOS" if decoder else "before the text",
        "inputs": {"image_embedding": "float32 (batch, max_images, vision_dim): cached vision features",
                   "image_mask": "int64 (batch, max_images): 1 = usable image in that slot"},
        "vision_graph": {"files": [VISION_FP32], "meta": VISION_META,
                         "precision": "fp32 only: EfficientNet-Lite0's fp16 graph misses the 5e-3 parity bar"},
    }


def read_manifest(bundle: Path, verify_hashes: bool = True) -> dict:
    """The manifest of a bundle, after checking that its files are there and unchanged."""
    path = bundle / MANIFEST
    if not path.is_file():
        if (bundle / run_dir.CONFIG).exists() and (bundle / run_dir.MODEL).exists():
            raise UserError(f"{bundle}: this is a training run, not a bundle; run `xmctag export {bundle} --out DIR`")
        raise UserError(f"{bundle}: not an xmctag bundle (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}) (re-export the bundle)") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{path}: not a JSON object (re-export the bundle)")
    if "format" not in manifest:
        raise UserError(f"{path}: missing key 'format' (re-export the bundle)")
    if manifest["format"] != FORMAT:
        raise UserError(f"{bundle}: bundle format {manifest['format']!r}, this xmctag reads {FORMAT!r}")
    _check_manifest(path, manifest)
    for name, digest in manifest["files"].items():
        file = bundle / name
        if not file.is_file():
            raise UserError(f"{bundle}: bundle is incomplete, {name} is missing")
        if verify_hashes and _sha256(file) != digest:
            raise UserError(f"{bundle}: {name} does not match the manifest (modified or corrupt bundle)")
    return manifest


# What tagging reads from a manifest: key -> its type, or the keys of a section that must be there.
REQUIRED_KEYS = {
    "bundle_id": str,
    "files": dict,
    "dims": ("embedding", "index", "labels"),
    "graph": ("files",),
    "tokenization": ("tokenizer", "max_length", "pad_id"),
    "scoring": ("scale",),
}
REQUIRED_FUSION_KEYS = ("vision", "model_id", "vision_dim", "image_col", "max_images")


def _check_manifest(path: Path, manifest: dict) -> None:
    """A ``UserError`` naming the first key tagging needs that the manifest lacks or has with the wrong type."""
    def fail(key: str, problem: str = "missing") -> None:
        raise UserError(f"{path}: {problem} key {key!r} (re-export the bundle)")

    sections = dict(REQUIRED_KEYS)
    if "fusion" in manifest:
        sections["fusion"] = REQUIRED_FUSION_KEYS
    for key, wanted in sections.items():
        if key not in manifest:
            fail(key)
        value = manifest[key]
        if isinstance(wanted, type):
            if not isinstance(value, wanted):
                fail(key, "invalid")
            continue
        if not isinstance(value, dict):
            fail(key, "invalid")
        for sub in wanted:
            if sub not in value:
                fail(f"{key}.{sub}")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in manifest["files"].items()):
        fail("files", "invalid")
    if not isinstance(manifest["graph"]["files"], list):
        fail("graph.files", "invalid")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _versions() -> dict[str, str]:
    import importlib.metadata

    import xmctag

    versions = {"xmctag": xmctag.__version__}
    for dist in ("torch", "transformers", "optimum-onnx", "onnx", "onnxruntime", "onnxruntime-gpu", "faiss-cpu",
                 "faiss-gpu", "tokenizers", "polars"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def label_count(manifest: dict) -> int:
    return int(manifest["dims"]["labels"])


def load_label_vectors(bundle: Path) -> np.ndarray:
    return np.load(bundle / run_dir.LABEL_VECTORS)
