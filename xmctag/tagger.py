"""``xmctag.Tagger``: a loaded bundle that tags products. Needs ONNX Runtime, faiss, tokenizers and polars (no torch).

    tagger = Tagger.load("export/demo")                   # device "auto": CUDA + fp16 graph when available
    frame = tagger.tag(pl.read_parquet("catalog.parquet"), top_k=5)
    summary = tagger.tag_file("catalog.parquet", "preds.parquet", top_k=5)

Per product: text from the model's text columns -> tokens -> ONNX encoder -> embedding q -> faiss searches of the
label vectors (query [q, 1]) and of the training products (kNN) -> blended score in [0, 1] (``xmctag.scoring``)
-> top-k. ``tag_file`` streams the catalog in batches, so memory stays bounded whatever its size (the bundle's
indexes are the fixed cost), and writes the output atomically (``xmctag.io.writers``).

Bundles with image fusion (manifest ``fusion``) also read the catalog's image column: cached image embeddings are
looked up, new pictures decoded by a thread pool and embedded with the bundle's ``vision.onnx``
(``xmctag.vision.tagging``), and the text graph gets them as ``image_embedding`` / ``image_mask``. In ``tag_file``
that image work runs one batch ahead in a background thread, so decoding overlaps the text encoder. Text-only
bundles never touch any of it.
"""

from __future__ import annotations

import functools
import queue
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from xmctag import bundle as layout
from xmctag import run_dir
from xmctag.backend import runtime
from xmctag.config import Config
from xmctag.data import check_columns, check_text_column, is_parquet, product_text_expr
from xmctag.errors import UserError, first_line
from xmctag.io.writers import PredictionWriter, resolve_format
from xmctag.label_groups import group_ids
from xmctag.models.prompt import PromptTemplate
from xmctag.models.tokens import pad
from xmctag.progress import Progress
from xmctag.scoring import NeighbourLabels, rank_labels

SKIP_EMPTY_TEXT = "empty text"
SKIP_NO_ID = "no id"


@dataclass
class TagSummary:
    output: Path | None
    rows_read: int = 0
    rows_tagged: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    images: dict[str, int] | None = None  # fused bundles: ImageCounts (used, missing, broken, cached, ...)
    image_cache: Path | None = None
    without_labels: int = 0  # products tagged whose labels all scored below min_score (no label written)
    top_k: int = 0  # labels per product asked for, capped at the number of labels

    @property
    def products_per_second(self) -> float:
        return self.rows_tagged / self.seconds if self.seconds > 0 else 0.0


ENCODE_BATCH_CPU = 64
ENCODE_BATCH_CUDA = 512


class Tagger:
    """A bundle ready to tag: ONNX session, tokenizer, faiss indexes (labels, training products), label table."""

    def __init__(self, path: Path, manifest: dict, config: Config, session, tokenizer, pad_id: int, index,
                 label_ids: list[str], label_texts: list[str], device: str, encode_batch_size: int = ENCODE_BATCH_CPU,
                 neighbour_index=None, neighbour_labels: NeighbourLabels | None = None,
                 exclusive_groups: list[str | None] | None = None):
        self.path = path
        self.manifest = manifest
        self.config = config
        self.session = session
        self.tokenizer = tokenizer
        self.pad_id = pad_id
        self.index = index
        self.label_ids = np.array(label_ids, dtype=object)
        self.label_texts = np.array(label_texts, dtype=object)
        self.device = device
        scoring = manifest["scoring"]
        self.scale = float(scoring["scale"])
        self.knn_neighbours = int(scoring.get("knn_neighbours", 0)) if neighbour_index is not None else 0
        self.knn_temperature = float(scoring.get("knn_temperature", 0.0))
        self.knn_weight = float(scoring.get("knn_weight", 0.0)) if self.knn_neighbours else 0.0
        self.neighbour_index = neighbour_index
        self.neighbour_labels = neighbour_labels
        # [w_l, b_l] rows, memory-mapped: only the rows of candidate labels are read (see scoring.blend_top_k)
        self.label_vectors = np.load(path / run_dir.LABEL_VECTORS, mmap_mode="r")
        self.encode_batch_size = encode_batch_size
        self.groups = group_ids(exclusive_groups)  # at most one label of each exclusive facet per product

    @property
    def bundle_id(self) -> str:
        return self.manifest["bundle_id"]

    @property
    def fusion(self) -> dict | None:
        """The manifest's ``fusion`` section for a bundle with image fusion, else None (text only)."""
        return self.manifest.get("fusion")

    def images(self, cache_dir: str | Path | None = None, output: Path | None = None, workers: int = 8):
        """A ``BundleImages`` reading the image cache (``xmctag.vision.tagging.resolve_cache_dir``)."""
        from xmctag.vision.tagging import BundleImages, resolve_cache_dir

        directory = resolve_cache_dir(cache_dir, self.fusion.get("cache_dir"), output)
        return BundleImages(self.path, self.fusion, directory, self.device, workers)

    @functools.cached_property
    def prompt(self) -> PromptTemplate | None:
        """A decoder's prompt template (ids built as in training), None for encoders (the tokenizer's own)."""
        prompt = self.manifest["tokenization"].get("prompt")
        return PromptTemplate.from_dict(prompt) if prompt else None

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", threads: int | None = None,
             verify: bool = True, precision: str = "auto", exclusive_groups: bool = False,
             encode_batch_size: int | None = None) -> "Tagger":
        """``precision``: ``auto`` (fp16 graph on CUDA, fp32 on CPU), ``fp32``, ``fp16`` or ``int8`` (CPU: about
        2x the fp32 graph with AVX-512 VNNI, embeddings within a few degrees of fp32). ``exclusive_groups``: at
        most one label of each exclusive facet per product (``xmctag.label_groups``); False (default) ranks all
        labels freely.
        ``encode_batch_size``: products per ONNX Runtime call (default: 64 on CPU, 512 on CUDA)."""
        from tokenizers import Tokenizer

        runtime.check_runtime_packages()  # both or neither of onnxruntime(-gpu) / faiss-cpu(-gpu): say so first
        path = Path(path)
        if not path.is_dir():
            raise UserError(f"--model {path}: no such bundle directory")
        manifest = layout.read_manifest(path, verify_hashes=verify)
        config = Config.load(path / run_dir.CONFIG)
        requested, device = device, runtime.resolve_device(device)
        graph = _choose_graph(manifest["graph"]["files"], device, precision)
        try:
            session = runtime.create_session(path / graph, device, threads)
        except runtime.CudaUnavailable as e:
            if requested != "auto":  # --device cuda was asked for: a CPU run would not be what the user wanted
                raise
            warnings.warn(f"{e}; tagging on the CPU", stacklevel=2)
            device = "cpu"
            graph = _choose_graph(manifest["graph"]["files"], device, precision)
            session = runtime.create_session(path / graph, device, threads)
        tokenization = manifest["tokenization"]
        tokenizer = Tokenizer.from_file(str(path / tokenization["tokenizer"]))
        tokenizer.no_padding()
        tokenizer.enable_truncation(tokenization["max_length"])
        index = runtime.faiss().read_index(str(path / layout.INDEX))
        wanted = ["label", "text", "exclusive_group"] if exclusive_groups else ["label", "text"]
        labels = pl.read_parquet(path / run_dir.LABELS,  # not encoder_text: synonyms can be large
                                 columns=[c for c in wanted if c in pl.read_parquet_schema(path / run_dir.LABELS)])
        dims = manifest["dims"]
        if index.d != dims["index"] or index.ntotal != dims["labels"] or len(labels) != dims["labels"]:
            raise UserError(f"{path}: index ({index.ntotal} x {index.d}) and label table ({len(labels)} rows) do not "
                            f"match the manifest ({dims['labels']} x {dims['index']})")
        neighbour_index = neighbour_labels = None
        if dims.get("neighbours"):
            neighbour_index = runtime.faiss().read_index(str(path / layout.NEIGHBOUR_INDEX))
            neighbour_labels = NeighbourLabels.load(path / run_dir.TRAIN_LABELS)
            if neighbour_index.ntotal != dims["neighbours"] or len(neighbour_labels) != dims["neighbours"]:
                raise UserError(f"{path}: neighbour index ({neighbour_index.ntotal}) and training labels "
                                f"({len(neighbour_labels)}) do not match the manifest ({dims['neighbours']})")
        groups = labels["exclusive_group"].to_list() if "exclusive_group" in labels else None
        if exclusive_groups and group_ids(groups) is None:  # asked for, but there is nothing to enforce
            warnings.warn(f"--exclusive-groups: {path} has no exclusive label groups (training found none, or the "
                          "bundle predates them); all labels are ranked freely", stacklevel=2)
        if encode_batch_size is None:  # a GPU idles on batches of 64; on a CPU larger batches only pad more
            encode_batch_size = ENCODE_BATCH_CUDA if device == "cuda" else ENCODE_BATCH_CPU
        return cls(path, manifest, config, session, tokenizer, int(tokenization["pad_id"]), index,
                   labels["label"].to_list(), labels["text"].to_list(), device, encode_batch_size,
                   neighbour_index=neighbour_index, neighbour_labels=neighbour_labels,
                   exclusive_groups=groups)

    # -- core ----------------------------------------------------------------------------------------------------
    def embed(self, texts: list[str], images: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """``(n, d)`` float32 unit-norm embeddings; batches formed in length order, output in input order.

        ``images``: fused bundles, ``(features (n, M, V), mask (n, M))`` from ``BundleImages.features``; None: no
        product has an image.
        """
        if self.fusion is not None and images is None:
            images = (np.zeros((len(texts), self.fusion["max_images"], self.fusion["vision_dim"]), np.float32),
                      np.zeros((len(texts), self.fusion["max_images"]), np.int64))
        if self.prompt is not None:
            # The tokenizer truncates at max_length, never below the title budget, so these are training's ids.
            has_image = (images[1].sum(axis=1) > 0).tolist() if images is not None else None
            ids = self.prompt.ids(self.tokenizer, list(texts), self.manifest["tokenization"]["max_length"], has_image)
        else:
            ids = [e.ids for e in self.tokenizer.encode_batch(list(texts))]
        dim = self.manifest["dims"]["embedding"]
        out = np.zeros((len(ids), dim), dtype=np.float32)
        order = np.argsort([len(x) for x in ids], kind="stable")
        for start in range(0, len(ids), self.encode_batch_size):
            rows = order[start:start + self.encode_batch_size]
            input_ids, mask = pad([ids[i] for i in rows], self.pad_id)
            feeds = {"input_ids": input_ids, "attention_mask": mask}
            if images is not None:
                feeds.update(image_embedding=images[0][rows], image_mask=images[1][rows].astype(np.int64))
            out[rows] = self.session.run(["embedding"], feeds)[0]
        return out

    def predict(self, texts: list[str], top_k: int = 5, min_score: float | None = None,
                images: tuple[np.ndarray, np.ndarray] | None = None):
        """Label indices ``(n, k)`` (-1 where below ``min_score``) and scores ``(n, k)`` in [0, 1], best first;
        ``k`` is ``top_k``, at most the number of labels."""
        check_options(top_k, min_score)
        return self.rank(self.embed(texts, images), top_k, min_score)

    def rank(self, embeddings: np.ndarray, top_k: int = 5, min_score: float | None = None):
        """``predict`` from ``(n, d)`` product embeddings: label-vector and neighbour searches, blend, top-k."""
        check_options(top_k, min_score)
        top_k = min(top_k, len(self.label_ids))  # more would only be -1 padding, and memory grows with batch x k
        votes = None
        if self.knn_neighbours:
            sims, neighbours = self.neighbour_index.search(embeddings, self.knn_neighbours)
            votes = self.neighbour_labels.votes(neighbours, sims, self.knn_temperature)
        indices, scores = rank_labels(embeddings, self.label_vectors, self.scale, self.index.search, votes,
                                      self.knn_weight, top_k, self.groups)
        if min_score is not None:
            indices = np.where(scores >= min_score, indices, -1)
        return indices, scores

    def tag(self, frame: pl.DataFrame, top_k: int = 5, min_score: float | None = None,
            cache_dir: str | Path | None = None, base_dir: str | Path = ".") -> pl.DataFrame:
        """``id``, ``labels``, ``scores`` for the rows of ``frame`` that have an id and text (others are left out).

        Fused bundles read ``frame``'s image column when it has one (relative paths against ``base_dir``).
        """
        self._check_schema("frame", frame.schema)
        batch = self._prepare(frame, source="frame")
        images = None
        if self.fusion is not None and "image" in batch.columns:
            images = self.images(cache_dir).features(batch["image"].to_list(), Path(base_dir))
        ids, labels, _, scores = self._tag_prepared(batch, top_k, min_score, images)
        return pl.DataFrame({"id": ids, "labels": labels, "scores": [s.tolist() for s in scores]},
                            schema={"id": pl.String, "labels": pl.List(pl.String), "scores": pl.List(pl.Float32)})

    # -- whole files ---------------------------------------------------------------------------------------------
    def tag_file(self, catalog: str | Path, output: str | Path | None = None, top_k: int = 5,
                 fmt: str | None = None, min_score: float | None = None, batch_size: int = 4096, strict: bool = False,
                 progress: bool = True, cache_dir: str | Path | None = None, workers: int = 8) -> TagSummary:
        """Streams ``catalog`` (Parquet) through the model into ``output``; returns counts and timing.

        ``fmt``: ``parquet``, ``csv`` or ``jsonl``; None: from ``output``'s extension (``.parquet``, ``.csv``,
        ``.jsonl``/``.ndjson``/``.json``), parquet when it has none of those or there is no ``output``. A ``fmt``
        that contradicts a known extension is an error (``xmctag.io.writers.resolve_format``).
        Rows without an id or without text are skipped and counted in ``TagSummary.skipped`` (``strict``: an error
        naming the row). Rows repeating an earlier row's id are tagged like any other (catching them would take
        memory that grows with the catalog; ``xmctag eval`` refuses such a file). ``top_k`` is at most the number
        of labels.

        Fused bundles: ``cache_dir`` is the image-embedding cache (default: the bundle's, see
        ``xmctag.vision.tagging.resolve_cache_dir``), ``workers`` the threads that read and decode new pictures.
        """
        catalog = Path(catalog)
        check_options(top_k, min_score)
        top_k = min(top_k, len(self.label_ids))
        fmt = resolve_format(Path(output) if output is not None else None, fmt)
        columns = self._check_catalog(catalog)
        if self.fusion is not None and self.fusion["image_col"] not in columns:  # fine, but not what it was made for
            warnings.warn(f"{catalog} has no image column {self.fusion['image_col']!r}: products are tagged from "
                          "text only", stacklevel=2)
        output = Path(output) if output is not None else default_output_path(catalog, fmt)
        if output.resolve() == catalog.resolve():
            raise UserError(f"--output {output}: would overwrite the catalog being tagged")
        summary = TagSummary(output=output, top_k=top_k)
        metadata = {"bundle_id": self.bundle_id, "bundle": str(self.path.resolve()), "catalog": str(catalog),
                    "top_k": top_k, "min_score": min_score, "text_cols": ",".join(self.config.text_cols)}
        # Opened (its temporary file created) before any work: an output that cannot be written fails now, not
        # after the whole catalog has been tagged.
        with PredictionWriter(output, fmt, metadata) as writer:
            self._tag_into(writer, catalog, columns, summary, top_k, min_score, batch_size, strict, progress,
                           cache_dir, workers)
        return summary

    def _tag_into(self, writer: PredictionWriter, catalog: Path, columns: list[str], summary: TagSummary,
                  top_k: int, min_score: float | None, batch_size: int, strict: bool, progress: bool,
                  cache_dir: str | Path | None, workers: int) -> None:
        total = pl.scan_parquet(catalog).select(pl.len()).collect().item()
        show = Progress(progress)
        started = time.perf_counter()
        images = self.images(cache_dir, summary.output, workers) if self.fusion is not None else None

        def prepared():
            """(rows read, rows kept, rows skipped by reason, their image inputs or None) per catalog batch."""
            rows = 0
            for frame in _read_batches(catalog, columns, batch_size):
                skipped: dict[str, int] = {}
                batch = self._prepare(frame, source=str(catalog), row_offset=rows, strict=strict, skipped=skipped)
                features = None
                # A catalog without the image column is tagged text only (``embed`` masks every image slot).
                if images is not None and len(batch) and "image" in batch.columns:
                    features = images.features(batch["image"].to_list(), catalog.parent, row0=rows)
                rows += len(frame)
                yield len(frame), batch, skipped, features

        # Fused: the image work (cache lookups, decoding, vision graph) runs a batch ahead in a background thread.
        batches = prepared() if images is None else _prefetch(prepared())
        with show.task("tagging", total=total, unit="products") as update:
            for n_read, batch, skipped, features in batches:
                summary.rows_read += n_read
                for reason, n in skipped.items():
                    summary.skipped[reason] = summary.skipped.get(reason, 0) + n
                if len(batch):
                    ids, labels, texts, scores = self._tag_prepared(batch, top_k, min_score, features)
                    writer.write(ids, labels, texts, scores)
                    summary.rows_tagged += len(batch)
                    summary.without_labels += sum(not row for row in labels)
                if images is None:
                    update(n_read)
                else:
                    rate = images.slots_seen / max(time.perf_counter() - started, 1e-9)
                    update(n_read, **{"images/s": f"{rate:,.0f}"})
        summary.seconds = time.perf_counter() - started
        if images is not None:
            summary.images, summary.image_cache = images.counts.to_dict(), images.cache_dir

    def _check_catalog(self, catalog: Path) -> list[str]:
        """The columns to read from ``catalog``, after checking that it is a Parquet file with the model's id and
        text columns, of types that read as strings."""
        if catalog.is_dir():
            raise UserError(f"{catalog}: is a directory, not a Parquet file")
        if not catalog.is_file():
            raise UserError(f"{catalog}: no such file")
        if not is_parquet(catalog):  # by content: a CSV named .parquet, or a Parquet file named .csv, is caught
            raise UserError(f"{catalog}: not a Parquet file (xmctag tag reads Parquet catalogs)")
        try:
            schema = pl.read_parquet_schema(catalog)
        except Exception as e:  # noqa: BLE001 - polars, pyarrow and OS errors all mean the same thing here
            raise UserError(f"{catalog}: not a readable Parquet file ({first_line(e)})") from None
        self._check_schema(catalog, schema)
        columns = [self.config.id_col, *self.config.text_cols]
        if self.fusion is not None and self.fusion["image_col"] in schema:  # no image column: text only, still fine
            columns.append(self.fusion["image_col"])
        return columns

    def _check_schema(self, source, schema) -> None:
        """The model's id and text columns are in ``schema``, of types that read as strings."""
        check_columns(Path(source), list(schema), [self.config.id_col, *self.config.text_cols])
        check_text_column(source, self.config.id_col, schema[self.config.id_col], "a product id")
        for column in self.config.text_cols:
            check_text_column(source, column, schema[column], "product text")

    def _prepare(self, frame: pl.DataFrame, source: str, row_offset: int = 0, strict: bool = False,
                 skipped: dict[str, int] | None = None) -> pl.DataFrame:
        """``id``, ``text`` of the rows that have an id and text; the others are counted in ``skipped`` by reason
        (``SKIP_NO_ID``, ``SKIP_EMPTY_TEXT``), or under ``strict`` the first of them is an error. The callers
        check the columns (``_check_schema``): once per file, not once per batch."""
        columns = [pl.col(self.config.id_col).cast(pl.String).alias("id"),
                   product_text_expr(self.config.text_cols).alias("text")]
        if self.fusion is not None and self.fusion["image_col"] in frame.columns:
            columns.append(pl.col(self.fusion["image_col"]).alias("image"))
        prepared = frame.select(columns)
        no_id = prepared["id"].str.strip_chars().str.len_chars().fill_null(0) == 0  # null, empty or blank
        empty = prepared["text"].is_null() & ~no_id  # a row without either counts once, as "no id"
        bad = no_id | empty
        if strict and bad.any():
            row = int(bad.arg_true()[0])
            if no_id[row]:
                raise UserError(f"{source}: row {row_offset + row} has no id in column {self.config.id_col!r} "
                                f"(--strict)")
            raise UserError(f"{source}: row {row_offset + row} (id {prepared['id'][row]!r}) has no text in "
                            f"{', '.join(self.config.text_cols)} (--strict)")
        if skipped is not None:
            for reason, mask in ((SKIP_NO_ID, no_id), (SKIP_EMPTY_TEXT, empty)):
                if n := int(mask.sum()):
                    skipped[reason] = skipped.get(reason, 0) + n
        return prepared.filter(~bad)

    def _tag_prepared(self, batch: pl.DataFrame, top_k: int, min_score: float | None, images=None):
        indices, scores = self.predict(batch["text"].to_list(), top_k, min_score, images)
        keep = indices >= 0
        labels = [self.label_ids[row[k]].tolist() for row, k in zip(indices, keep)]
        texts = [self.label_texts[row[k]].tolist() for row, k in zip(indices, keep)]
        return batch["id"].to_list(), labels, texts, [s[k] for s, k in zip(scores, keep)]


def check_options(top_k: int, min_score: float | None) -> None:
    if top_k < 1:
        raise UserError(f"--top-k must be >= 1, not {top_k}")
    if min_score is not None and not 0.0 <= min_score <= 1.0:  # also refuses nan, which would cut every label
        raise UserError(f"--min-score must be between 0 and 1 (scores are in [0, 1]), not {min_score}")


def _choose_graph(files: list[str], device: str, precision: str) -> str:
    by_precision = {"fp32": layout.ONNX_FP32, "fp16": layout.ONNX_FP16, "int8": layout.ONNX_INT8}
    if precision == "auto":
        return layout.ONNX_FP16 if device == "cuda" and layout.ONNX_FP16 in files else layout.ONNX_FP32
    if precision not in by_precision:
        raise UserError(f"--precision must be auto, fp32, fp16 or int8, not {precision!r}")
    if by_precision[precision] not in files:
        raise UserError(f"--precision {precision}: this bundle has no {by_precision[precision]} (re-export it)")
    return by_precision[precision]


def default_output_path(catalog: Path, fmt: str) -> Path:
    suffix = {"parquet": ".parquet", "csv": ".csv", "jsonl": ".jsonl"}.get(fmt, f".{fmt}")
    return catalog.with_name(f"{catalog.stem}.predictions{suffix}")


def _read_batches(catalog: Path, columns: list[str], batch_size: int):
    """Polars streaming read: frames of about ``batch_size`` rows, memory bounded by the batch, not the file."""
    try:
        yield from pl.scan_parquet(catalog).select(columns).collect_batches(chunk_size=batch_size)
    except (pl.exceptions.PolarsError, OSError) as e:
        raise UserError(f"{catalog}: cannot read ({first_line(e)})") from None


def _prefetch(items, depth: int = 2):
    """Iterates ``items`` in a background thread, up to ``depth`` items ahead; its exceptions are re-raised here.

    ONNX Runtime and PIL release the GIL, so the producer's image decoding and vision graph run while the consumer
    encodes text. Stopping early (an error downstream) tells the producer to stop at its next item.
    """
    done = object()
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in items:
                if not put((None, item)):
                    return
            put((None, done))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            put((e, None))

    thread = threading.Thread(target=produce, name="xmctag-images", daemon=True)
    thread.start()
    try:
        while True:
            error, item = buffer.get()
            if error is not None:
                raise error
            if item is done:
                return
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)
