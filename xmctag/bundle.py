"""Layout of a model bundle (what ``xmctag export`` writes and ``xmctag tag`` reads).

    encoder.onnx           fp32 graph for CPU: input_ids, attention_mask [, image_embedding, image_mask] -> embedding
    encoder.fp16.onnx      the same graph with fp16 weights, for CUDA (optional)
    encoder.int8.onnx      the fp32 graph with int8 weights (dynamic quantisation): faster on CPU, approximate
    tokenizer/             tokenizer files (tokenizer.json is what tagging uses)
    labels.parquet         label, text, encoder_text, exclusive_group, train_count
    label_embeddings.npy   (L, d) label-text embeddings: tagging never reads them; ``xmctag relabel`` fits its
                           vector map for new labels on them (``xmctag.scoring.new_labels``)
    label_vectors.npy      (L, d + 1) rows [w_l, b_l]; the exact label search runs on it directly (queries
                           [embedding, 1]), and an approximate one re-scores its candidates on it
    labels.faiss           approximate label index only (manifest ``index.labels.kind`` "ivf"): a faiss IVF index
                           with 8-bit codes of label_vectors (``xmctag.backend.index``). Bundles from before
                           2026-12-03 (no ``index`` section) hold an exact IndexFlatIP copy of label_vectors here
    neighbours.faiss       faiss inner-product index over the training products' embeddings (kNN votes; optional):
                           IndexFlatIP (exact), or IVF with fp16 codes (``index.neighbours.kind`` "ivf"); the only
                           copy of those embeddings in the bundle
    train_labels.npz       the training products' label indices (CSR), row i of neighbours.faiss -> its labels
    train_ids.parquet      the training products' ids (String column ``id``), row i of neighbours.faiss -> its id;
                           read only by ``tag --evidence`` (optional: bundles of runs from before 2026-12-03 lack it)
    vision.onnx            image fusion only: the frozen vision encoder, pixel_values -> image_embedding (fp32 only)
    vision.json            image fusion only: its model id, dim and preprocessing (xmctag.vision.onnx_runtime)
    lexical/               the lexical model (TF-IDF + label trees, ``xmctag.lexical``; optional): the manifest's
                           ``lexical`` section holds its fusion weights, candidates and beam
    calibration.npy        float32 (L,) score thresholds of ``tag --calibrated`` (optional; ``xmctag calibrate``
                           adds it, with the manifest's ``calibration`` section: ``xmctag.calibration``)
    config.json            the training Config
    README.md              model card of the run
    manifest.json          format ("xmctag-bundle/2"), bundle_id, files (the sha256 of every other file), dims,
                           graph, tokenization, scoring, training, index (the kind, parameters and measured recall
                           of each search: ``xmctag.backend.index``), fusion (image fusion only),
                           lexical (with a lexical model), relabel (a label table changed by ``xmctag.relabeller``),
                           and, outside the bundle id, created, source_run, versions and parity_max_abs
                           (xmctag.manifest)

A bundle holds these files and nothing else: every file in it is listed in the manifest's ``files``, and its
``bundle_id`` is a hash of the file hashes and of every manifest section that affects results
(``xmctag.manifest.bundle_id_of``), so neither a file nor a setting changes without the id changing.

``Bundle.open(path)`` reads a bundle for tagging. Bundles are untrusted input: the manifest is checked first
(``xmctag.manifest.read_manifest``: keys and types, paths inside the bundle, the bundle id, no unlisted file or
outward symlink, every file present and, unless ``verify=False``, unchanged by its sha256), then that it lists the
files tagging reads. Each part is read on request; a file a library cannot read (truncated, damaged) is a one-line
``UserError`` naming it, and each part's size is checked against the manifest's ``dims``. ``xmctag.exporter``
writes bundles (``xmctag.manifest.seal``).
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import numpy as np

from xmctag import run_dir
from xmctag.config import Config
from xmctag.errors import UnreadableFile, UserError, first_line
from xmctag.io.hashing import file_sha256
from xmctag.manifest import FORMAT, MANIFEST, read_manifest  # noqa: F401 - part of this module's API
from xmctag.vision.onnx_runtime import ONNX_FP32 as VISION_FP32
from xmctag.vision.onnx_runtime import VISION_META

ONNX_FP32 = "encoder.onnx"
ONNX_FP16 = "encoder.fp16.onnx"
ONNX_INT8 = "encoder.int8.onnx"
GRAPHS_BY_PRECISION = {"fp32": ONNX_FP32, "fp16": ONNX_FP16, "int8": ONNX_INT8}
TOKENIZER = "tokenizer"
INDEX = "labels.faiss"
GPU_FROM = 50_000  # labels: tagging on CUDA searches them on the GPU from this many (xmctag.backend.gpu_search)
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


def _reason(e: BaseException, limit: int = 200) -> str:
    """A library's error in a few words: faiss's messages start with its C++ source location, dropped here."""
    text = first_line(e)
    text = text.rsplit("Error: ", 1)[-1] if text.startswith("Error in ") else text
    return text if len(text) <= limit else text[:limit] + "..."


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
        bundle.check_index_section()
        for name in bundle.required_files():
            if name not in bundle.manifest["files"]:
                raise UserError(f"{path}: bundle is incomplete, {name} is not in the manifest's files (re-export "
                                "the bundle)")
        with bundle._reading(run_dir.CONFIG) as file:  # Config.load's own message would not say "re-export"
            bundle.config = Config.from_dict(json.loads(file.read_text()), source=str(file))
        return bundle

    def required_files(self) -> list[str]:
        """The files tagging reads: the manifest must list each (and so each is there, and hashed)."""
        names = [run_dir.CONFIG, run_dir.LABELS, run_dir.LABEL_VECTORS, ONNX_FP32,
                 self.manifest["tokenization"]["tokenizer"], *self.manifest["graph"]["files"]]
        labels = self.index_entry("labels")
        if labels is None or labels["kind"] != "exact":  # exact: label_vectors.npy is searched directly
            names.append(INDEX)
        if self.dims.get("neighbours"):
            names += [NEIGHBOUR_INDEX, run_dir.TRAIN_LABELS]
        if self.fusion is not None:
            names += [VISION_FP32, VISION_META]
        if self.manifest.get("lexical") is not None:
            folder = self.manifest["lexical"]["folder"]
            names += [f"{folder}/lexical.json", f"{folder}/features.json"]
        return names

    def index_entry(self, name: str) -> dict | None:
        """The manifest's ``index`` entry of the search ``name`` (``labels``, ``neighbours``), or None (a bundle
        from before the section: exact faiss indexes, ``xmctag.backend.index``)."""
        return (self.manifest.get("index") or {}).get(name)

    def check_index_section(self) -> None:
        """A one-line ``UserError`` naming the first key of the ``index`` section that is missing or out of range:
        its ``nprobe`` and ``refine`` drive tagging (``xmctag.backend.index.entry_problem``)."""
        from xmctag.backend.index import entry_problem

        section = self.manifest.get("index")
        if section is None:
            return
        searches = ["labels", "neighbours"] if self.dims.get("neighbours") else ["labels"]
        for name in [*searches, *section]:
            problem = entry_problem(section.get(name)) if name in searches else ""
            if problem is not None:
                raise UserError(f"{self.path / MANIFEST}: invalid key {'index.' + name + problem!r} (re-export the "
                                "bundle)")

    def check_file(self, name: str) -> None:
        """That the listed file ``name`` still matches its sha256 (for readers that open with ``verify=False``)."""
        if file_sha256(self.path / name) != self.manifest["files"][name]:
            raise UserError(f"{self.path}: {name} does not match the manifest (modified or corrupt bundle)")

    @contextlib.contextmanager
    def _reading(self, name: str):
        """Yields the path of ``name``; any library error while it is read becomes a one-line ``UserError`` naming
        it. Other ``UserError``s (a missing GPU, a size that does not match) pass as they are."""
        try:
            yield self.path / name
        except UnreadableFile as e:
            try:
                name = Path(e.path).relative_to(self.path).as_posix()
            except ValueError:
                pass
            raise UserError(f"{self.path}: bundle file {name} is unreadable ({e.reason}); re-export the bundle") \
                from None
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - numpy, faiss, polars, tokenizers: each raises its own types
            raise UserError(f"{self.path}: bundle file {name} is unreadable ({_reason(e)}); re-export the bundle") \
                from None

    def _mismatch(self, what: str) -> UserError:
        return UserError(f"{self.path}: {what} does not match the manifest; re-export the bundle")

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

    def session(self, device: str, precision: str = "auto", threads: int | None = None):
        """An ONNX Runtime session of ``graph(device, precision)``, its inputs and output checked."""
        from xmctag.backend import runtime

        graph = self.graph(device, precision)
        with self._reading(graph.name):
            session = runtime.create_session(graph, device, threads)
        inputs = ["input_ids", "attention_mask"] + (list(IMAGE_INPUTS) if self.fusion is not None else [])
        if (sorted(i.name for i in session.get_inputs()) != sorted(inputs)
                or "embedding" not in [o.name for o in session.get_outputs()]):
            raise self._mismatch(f"the inputs and outputs of {graph.name}")
        return session

    def tokenizer(self):
        """The ``tokenizers.Tokenizer`` tagging uses: no padding, truncation at ``max_length``."""
        from tokenizers import Tokenizer

        tokenization = self.manifest["tokenization"]
        with self._reading(tokenization["tokenizer"]) as file:
            tokenizer = Tokenizer.from_file(str(file))
            tokenizer.no_padding()
            tokenizer.enable_truncation(tokenization["max_length"])
        return tokenizer

    def prompt(self):
        """A decoder's ``PromptTemplate`` (``tokenization.prompt``), None for encoders; checked to leave room for
        the text within ``max_length``."""
        from xmctag.models.prompt import PromptTemplate

        values = self.manifest["tokenization"].get("prompt")
        if not values:
            return None

        def ids(v) -> bool:
            return isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v)

        if not (ids(values.get("prefix_ids")) and ids(values.get("image_prefix_ids")) and ids([values.get("eos_id")])
                and isinstance(values.get("join"), str) and ids([values.get("image_tokens", 1)])):
            raise UserError(f"{self.path / MANIFEST}: invalid key 'tokenization.prompt' (re-export the bundle)")
        prompt = PromptTemplate.from_dict(values)
        prompt.title_budget(self.manifest["tokenization"]["max_length"], self.fusion is not None, "max_length")
        return prompt

    def labels(self, columns: list[str], optional: tuple[str, ...] = ("exclusive_group",)):
        """The label table's ``columns`` (a polars frame; not ``encoder_text``: synonyms can be large), after
        checking its length against the manifest; a column not in ``optional`` must be there."""
        import polars as pl

        with self._reading(run_dir.LABELS) as table:
            schema = pl.read_parquet_schema(table)
            labels = pl.read_parquet(table, columns=[c for c in columns if c in schema])
        for column in columns:
            if column not in schema and column not in optional:
                raise UserError(f"{self.path}: bundle file {run_dir.LABELS} has no column {column!r}; re-export the "
                                "bundle")
            if column in ("label", "text") and column in schema and schema[column] != pl.String:
                raise UserError(f"{self.path}: bundle file {run_dir.LABELS}: column {column!r} is not text; "
                                "re-export the bundle")
        if len(labels) != self.dims["labels"]:
            raise self._mismatch(f"the label table ({len(labels)} rows, manifest: {self.dims['labels']} labels)")
        return labels

    def label_index(self, device: str = "cpu"):
        """The label search (``search(queries [q, 1], n) -> (logits, label rows)``, ``ntotal``, ``d``) of the kind
        the manifest's ``index.labels`` names (``xmctag.backend.index``): exact over ``label_vectors.npy``, or the
        IVF index in ``labels.faiss`` with the manifest's ``nprobe``, its candidates re-scored exactly. A bundle
        without the section: the exact faiss index in ``labels.faiss``. Sizes are checked against the manifest.
        ``device`` ``cuda`` with ``GPU_FROM`` labels or more: fp16 matrix products and top-k on the GPU with ONNX
        Runtime, candidates re-scored exactly (``xmctag.backend.gpu_search``; the CPU search, with a warning, when
        its CUDA provider cannot start)."""
        from xmctag.backend import index as searches
        from xmctag.backend import runtime

        if device == "cuda" and self.dims["labels"] >= GPU_FROM:
            from xmctag.backend.gpu_search import OnnxTopK

            vectors = self.label_vectors()
            try:
                with self._reading(run_dir.LABEL_VECTORS):
                    return searches.RefinedSearch(OnnxTopK(vectors, "cuda"), vectors, searches.REFINE)
            except runtime.CudaUnavailable as e:
                warnings.warn(f"{e}; searching the labels on the CPU", stacklevel=2)
        entry = self.index_entry("labels")
        if entry is not None and entry["kind"] == "exact":
            return searches.ExactSearch(self.label_vectors())
        faiss = runtime.faiss()
        with self._reading(INDEX) as file:
            index = faiss.read_index(str(file))
        d = self.dims["index"] if entry is None else searches.padded_dim(self.dims["index"])  # IVF: SIMD padding
        if index.d != d or index.ntotal != self.dims["labels"]:
            raise self._mismatch(f"the index {INDEX} ({index.ntotal} x {index.d}, manifest: {self.dims['labels']} "
                                 f"x {self.dims['index']})")
        if entry is None:
            return index
        if searches.ivf_shape(index) != (entry["nlist"], entry["storage"]):
            raise self._mismatch(f"the index {INDEX} (not an inner-product IVF index with {entry['nlist']} cells "
                                 f"and {entry['storage']} codes)")
        searches.set_nprobe(index, entry["nprobe"])
        return searches.RefinedSearch(index, self.label_vectors(), entry.get("refine", 1))

    def label_vectors(self) -> np.ndarray:
        """``(L, d + 1)`` rows [w_l, b_l], memory-mapped: only the rows of candidate labels are read."""
        with self._reading(run_dir.LABEL_VECTORS) as file:
            vectors = np.load(file, mmap_mode="r", allow_pickle=False)
        if vectors.dtype != np.float32 or vectors.shape != (self.dims["labels"], self.dims["index"]):
            raise self._mismatch(f"{run_dir.LABEL_VECTORS} ({vectors.dtype} {vectors.shape}, manifest: float32 "
                                 f"{(self.dims['labels'], self.dims['index'])})")
        return vectors

    def label_embeddings(self) -> np.ndarray:
        """``(L, d)`` float32 label-text embeddings (``label_embeddings.npy``; tagging never reads them, ``xmctag
        relabel`` does)."""
        name = run_dir.LABEL_EMBEDDINGS
        if name not in self.manifest["files"]:
            raise UserError(f"{self.path}: bundle has no {name} (re-export the bundle)")
        with self._reading(name) as file:
            values = np.load(file, allow_pickle=False)
        if values.dtype != np.float32 or values.shape != (self.dims["labels"], self.dims["embedding"]):
            raise self._mismatch(f"{name} ({values.dtype} {values.shape}, manifest: float32 "
                                 f"{(self.dims['labels'], self.dims['embedding'])})")
        return values

    def neighbours(self):
        """``(faiss index over the training products, their NeighbourLabels)``, or None when the bundle has none."""
        from xmctag.backend import runtime
        from xmctag.scoring import NeighbourLabels

        n = self.dims.get("neighbours")
        if not n:
            return None
        faiss = runtime.faiss()
        with self._reading(NEIGHBOUR_INDEX) as file:
            index = faiss.read_index(str(file))
        with self._reading(run_dir.TRAIN_LABELS) as file:
            labels = NeighbourLabels.load(file)
        if index.ntotal != n or index.d != self.dims["embedding"]:
            raise self._mismatch(f"the neighbour index {NEIGHBOUR_INDEX} ({index.ntotal} x {index.d}, manifest: "
                                 f"{n} x {self.dims['embedding']})")
        entry = self.index_entry("neighbours")
        if entry is not None:
            from xmctag.backend import index as searches

            shape = searches.ivf_shape(index)
            if entry["kind"] == "ivf" and shape != (entry["nlist"], entry["storage"]) or \
                    entry["kind"] == "exact" and not isinstance(index, faiss.IndexFlatIP):
                raise self._mismatch(f"the neighbour index {NEIGHBOUR_INDEX} (not the manifest's {entry['kind']} "
                                     "index)")
            if shape is not None:
                searches.set_nprobe(index, entry["nprobe"])
        problem = labels.problem(n, self.dims["labels"])
        if problem:
            raise self._mismatch(f"{run_dir.TRAIN_LABELS} ({problem})")
        return index, labels

    def train_ids(self) -> np.ndarray:
        """The training products' ids, row i of the neighbour index -> its id (object array of str), for
        ``tag --evidence``; a ``UserError`` for a bundle without neighbours or without the ids."""
        import polars as pl

        n = self.dims.get("neighbours")
        if not n:
            raise UserError(f"--evidence: {self.path} has no neighbour index (trained with knn_neighbours 0), so no "
                            "training product votes for a label; retrain with knn_neighbours > 0")
        if run_dir.TRAIN_IDS not in self.manifest["files"]:
            raise UserError(f"--evidence: {self.path} has no {run_dir.TRAIN_IDS} (its run predates training ids); "
                            "retrain the run and export it again")
        with self._reading(run_dir.TRAIN_IDS) as file:
            schema = pl.read_parquet_schema(file)
            if "id" not in schema or schema["id"] not in (pl.String, pl.Null):
                raise UserError(f"{self.path}: bundle file {run_dir.TRAIN_IDS} has no String column 'id'; "
                                "re-export the bundle")
            ids = pl.read_parquet(file, columns=["id"])["id"]
        if len(ids) != n:
            raise self._mismatch(f"{run_dir.TRAIN_IDS} ({len(ids)} ids, manifest: {n} training products)")
        return ids.to_numpy().astype(object)

    def lexical(self):
        """The lexical model (``xmctag.lexical.LexicalModel``) and each label's fusion weight ``(L,)``, or None when
        the bundle has none. The weights come from the manifest (covered by the bundle id), and must be the ones
        its ``lexical.json`` was saved with; a label the trees cannot return (a relabelled bundle's new labels,
        ``LexicalModel.reachable``) gets weight 0."""
        from xmctag.lexical import LexicalModel, label_weights

        section = self.manifest.get("lexical")
        if section is None:
            return None
        with self._reading(f"{section['folder']}/lexical.json"):
            model = LexicalModel.load(self.path / section["folder"])
        if model.n_labels != self.dims["labels"]:
            raise self._mismatch(f"the lexical model ({model.n_labels} labels, manifest: {self.dims['labels']})")
        saved = {key: model.fusion.get(key) for key in ("bands", "weights")}
        if saved != {key: section[key] for key in ("bands", "weights")} or \
                (model.candidates, int(model.settings["beam"])) != (section["candidates"], section["beam"]):
            raise self._mismatch("the lexical model's fusion weights, candidates or beam")
        counts = self.labels(["train_count"], optional=())["train_count"].to_numpy()
        # A label the trees cannot return (added by xmctag relabel) is ranked by its dense score alone.
        return model, np.where(model.reachable(), label_weights(section, counts), 0.0)

    def calibration(self) -> np.ndarray | None:
        """The thresholds of ``tag --calibrated`` (``xmctag.calibration``): float32 ``(L,)``, each in [0, 1] or
        +inf, from the file the manifest's ``calibration`` section names (its sha256 checked even when the bundle was
        opened with ``verify=False``: it is small); None when the bundle has no calibration."""
        from xmctag.scoring.thresholds import check_thresholds

        section = self.manifest.get("calibration")
        if section is None:
            return None
        name = section["file"]
        self.check_file(name)
        with self._reading(name) as file:  # memory-mapped: a header claiming a huge array fails, never allocates
            thresholds = np.array(np.load(file, mmap_mode="r", allow_pickle=False))
        problem = check_thresholds(thresholds, self.dims["labels"])
        if problem:
            raise self._mismatch(f"{name} ({problem})")
        return thresholds

    def vision_encoder(self, device: str = "cpu"):
        """The bundle's vision graph as an ``OnnxVisionEncoder`` (fused bundles), checked against ``fusion``."""
        from xmctag.vision.onnx_runtime import OnnxVisionEncoder

        with self._reading(VISION_FP32):
            encoder = OnnxVisionEncoder(self.path, fp16=False, device=device)
        if encoder.model_id != self.fusion["model_id"] or encoder.dim != self.fusion["vision_dim"]:
            raise self._mismatch(f"{VISION_META} (model {encoder.model_id}, {encoder.dim}-d; manifest: "
                                 f"{self.fusion['model_id']}, {self.fusion['vision_dim']}-d)")
        return encoder
