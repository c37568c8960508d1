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

``Bundle.open(path)`` reads a bundle for tagging: the manifest is checked (format, the keys tagging needs, every file
present and, unless ``verify=False``, unchanged by its sha256) before anything else is read, and each part is then
read with its size checked against the manifest's ``dims``. ``xmctag.exporter`` writes bundles.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from xmctag import run_dir
from xmctag.config import Config
from xmctag.errors import UserError
from xmctag.io.hashing import file_sha256

FORMAT = "xmctag-bundle/1"
ONNX_FP32 = "encoder.onnx"
ONNX_FP16 = "encoder.fp16.onnx"
ONNX_INT8 = "encoder.int8.onnx"
GRAPHS_BY_PRECISION = {"fp32": ONNX_FP32, "fp16": ONNX_FP16, "int8": ONNX_INT8}
TOKENIZER = "tokenizer"
INDEX = "labels.faiss"
NEIGHBOUR_INDEX = "neighbours.faiss"
MANIFEST = "manifest.json"
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
        if verify_hashes and file_sha256(file) != digest:
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



class Bundle:
    """A bundle directory with a checked manifest (``Bundle.open``); its parts are read on request."""

    def __init__(self, path: Path, manifest: dict, config: Config):
        self.path, self.manifest, self.config = path, manifest, config

    @classmethod
    def open(cls, path: str | Path, verify: bool = True) -> "Bundle":
        path = Path(path)
        if not path.is_dir():
            raise UserError(f"--model {path}: no such bundle directory")
        manifest = read_manifest(path, verify_hashes=verify)
        return cls(path, manifest, Config.load(path / run_dir.CONFIG))

    @property
    def bundle_id(self) -> str:
        return self.manifest["bundle_id"]

    @property
    def dims(self) -> dict:
        return self.manifest["dims"]

    @property
    def fusion(self) -> dict | None:
        """The manifest's ``fusion`` section for a bundle with image fusion, else None (text only)."""
        return self.manifest.get("fusion")

    def graph(self, device: str, precision: str = "auto") -> Path:
        """The encoder graph for ``device`` (``cpu``/``cuda``) and ``precision`` (``auto``: fp16 on CUDA when the
        bundle has it, else fp32; ``fp32``, ``fp16``, ``int8``)."""
        files = self.manifest["graph"]["files"]
        if precision == "auto":
            return self.path / (ONNX_FP16 if device == "cuda" and ONNX_FP16 in files else ONNX_FP32)
        if precision not in GRAPHS_BY_PRECISION:
            raise UserError(f"--precision must be auto, fp32, fp16 or int8, not {precision!r}")
        if GRAPHS_BY_PRECISION[precision] not in files:
            raise UserError(f"--precision {precision}: this bundle has no {GRAPHS_BY_PRECISION[precision]} "
                            "(re-export it)")
        return self.path / GRAPHS_BY_PRECISION[precision]

    def tokenizer(self):
        """The ``tokenizers.Tokenizer`` tagging uses: no padding, truncation at ``max_length``."""
        from tokenizers import Tokenizer

        tokenization = self.manifest["tokenization"]
        tokenizer = Tokenizer.from_file(str(self.path / tokenization["tokenizer"]))
        tokenizer.no_padding()
        tokenizer.enable_truncation(tokenization["max_length"])
        return tokenizer

    def labels(self, columns: list[str]):
        """The label table's ``columns`` that it has (a polars frame; not ``encoder_text``: synonyms can be
        large), after checking its length against the manifest."""
        import polars as pl

        table = self.path / run_dir.LABELS
        labels = pl.read_parquet(table, columns=[c for c in columns if c in pl.read_parquet_schema(table)])
        if len(labels) != self.dims["labels"]:
            raise UserError(f"{self.path}: label table ({len(labels)} rows) does not match the manifest "
                            f"({self.dims['labels']} labels)")
        return labels

    def label_index(self):
        """The faiss index over the label vectors, its size checked against the manifest."""
        from xmctag.backend import runtime

        index = runtime.faiss().read_index(str(self.path / INDEX))
        if index.d != self.dims["index"] or index.ntotal != self.dims["labels"]:
            raise UserError(f"{self.path}: index ({index.ntotal} x {index.d}) does not match the manifest "
                            f"({self.dims['labels']} x {self.dims['index']})")
        return index

    def label_vectors(self) -> np.ndarray:
        """``(L, d + 1)`` rows [w_l, b_l], memory-mapped: only the rows of candidate labels are read."""
        return np.load(self.path / run_dir.LABEL_VECTORS, mmap_mode="r")

    def neighbours(self):
        """``(faiss index over the training products, their NeighbourLabels)``, or None when the bundle has none."""
        from xmctag.backend import runtime
        from xmctag.scoring import NeighbourLabels

        if not self.dims.get("neighbours"):
            return None
        index = runtime.faiss().read_index(str(self.path / NEIGHBOUR_INDEX))
        labels = NeighbourLabels.load(self.path / run_dir.TRAIN_LABELS)
        if index.ntotal != self.dims["neighbours"] or len(labels) != self.dims["neighbours"]:
            raise UserError(f"{self.path}: neighbour index ({index.ntotal}) and training labels ({len(labels)}) do "
                            f"not match the manifest ({self.dims['neighbours']})")
        return index, labels
