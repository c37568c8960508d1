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
    README.md              model card of the run
    manifest.json          format ("xmctag-bundle/2"), bundle_id, files (the sha256 of every other file), dims,
                           graph, tokenization, scoring, training, fusion (image fusion only), and, outside the
                           bundle id, created, source_run, versions and parity_max_abs (xmctag.manifest)

A bundle holds these files and nothing else: every file in it is listed in the manifest's ``files``, and its
``bundle_id`` is a hash of the file hashes and of every manifest section that affects results
(``xmctag.manifest.bundle_id_of``), so neither a file nor a setting changes without the id changing.

``Bundle.open(path)`` reads a bundle for tagging. Bundles are untrusted input: the manifest is checked first
(``xmctag.manifest.read_manifest``: keys and types, paths inside the bundle, the bundle id, no unlisted file or
outward symlink, every file present and, unless ``verify=False``, unchanged by its sha256), then that it lists the
files tagging reads. Each part is read on request, its size checked against the manifest's ``dims``. ``xmctag.exporter``
writes bundles (``xmctag.manifest.seal``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from xmctag import run_dir
from xmctag.config import Config
from xmctag.errors import UserError
from xmctag.manifest import FORMAT, MANIFEST, file_sha256, read_manifest  # noqa: F401 - part of this module's API
from xmctag.vision.onnx_runtime import ONNX_FP32 as VISION_FP32
from xmctag.vision.onnx_runtime import VISION_META

ONNX_FP32 = "encoder.onnx"
ONNX_FP16 = "encoder.fp16.onnx"
ONNX_INT8 = "encoder.int8.onnx"
GRAPHS_BY_PRECISION = {"fp32": ONNX_FP32, "fp16": ONNX_FP16, "int8": ONNX_INT8}
TOKENIZER = "tokenizer"
INDEX = "labels.faiss"
NEIGHBOUR_INDEX = "neighbours.faiss"
IMAGE_INPUTS = ("image_embedding", "image_mask")
COPIED_FROM_RUN = (run_dir.CONFIG, run_dir.LABELS, run_dir.LABEL_EMBEDDINGS, run_dir.LABEL_VECTORS, run_dir.CARD)


def is_bundle(path: Path) -> bool:
    """Whether the directory ``path`` holds an xmctag bundle (of any format) and nothing else: a manifest naming
    every entry. What ``export --overwrite`` may replace; ``Bundle.open`` is what checks a bundle for use."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or not str(manifest.get("format", "")).startswith("xmctag-bundle/"):
        return False
    names = {name.split("/")[0] for name in manifest.get("files", {})} | {MANIFEST}
    return {entry.name for entry in path.iterdir()} <= names


class Bundle:
    """A bundle directory with a checked manifest (``Bundle.open``); its parts are read on request."""

    def __init__(self, path: Path, manifest: dict, config: Config | None = None):
        self.path, self.manifest, self.config = path, manifest, config

    @classmethod
    def open(cls, path: str | Path, verify: bool = True) -> "Bundle":
        path = Path(path)
        if not path.is_dir():
            raise UserError(f"--model {path}: no such bundle directory")
        bundle = cls(path, read_manifest(path, verify_hashes=verify))
        for name in bundle.required_files():
            if name not in bundle.manifest["files"]:
                raise UserError(f"{path}: bundle is incomplete, {name} is not in the manifest's files (re-export "
                                "the bundle)")
        bundle.config = Config.load(path / run_dir.CONFIG)
        return bundle

    def required_files(self) -> list[str]:
        """The files tagging reads: the manifest must list each (and so each is there, and hashed)."""
        names = [run_dir.CONFIG, run_dir.LABELS, run_dir.LABEL_VECTORS, INDEX, ONNX_FP32,
                 self.manifest["tokenization"]["tokenizer"], *self.manifest["graph"]["files"]]
        if self.dims.get("neighbours"):
            names += [NEIGHBOUR_INDEX, run_dir.TRAIN_LABELS]
        if self.fusion is not None:
            names += [VISION_FP32, VISION_META]
        return names

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
