"""``xmctag.Tagger``: a loaded bundle that tags products. Needs ONNX Runtime, faiss, tokenizers and polars (no torch).

    tagger = Tagger.load("export/demo")                   # device "auto": CUDA + fp16 graph when available
    frame = tagger.tag(pl.read_parquet("catalog.parquet"), top_k=5)
    summary = tagger.tag_file("catalog.parquet", "preds.parquet", top_k=5)

Per product: text from the model's text columns -> tokens -> ONNX encoder -> embedding q -> searches of the label
vectors (query [q, 1]) and training products (kNN; ``xmctag.backend.index``) -> blended score in [0, 1]
(``xmctag.scoring``), fused with the lexical model's scores when the bundle has one (``xmctag.lexical``: TF-IDF
label trees, on the CPU) -> top-k. ``tag_file`` streams the catalog in batches, so memory stays bounded whatever its
size (the bundle's indexes are the fixed cost), and writes the output atomically (``xmctag.io.writers``). The bundle
is read and checked by ``xmctag.bundle.Bundle``; the catalog by ``xmctag.io.catalog``.

Bundles with image fusion (manifest ``fusion``) also read the catalog's image column: cached image embeddings are
looked up, new pictures decoded by a thread pool and embedded with the bundle's ``vision.onnx``
(``xmctag.vision.tagging``), and the text graph gets them as ``image_embedding`` / ``image_mask``. In ``tag_file``
that image work runs one batch ahead in a background thread, so decoding overlaps the text encoder. Text-only
bundles never touch any of it.

``tag_file(..., previous=LAST)`` copies last night's rows of unchanged products instead of tagging them
(``xmctag.incremental``); ``evidence=N`` adds the training products that voted most for each product's labels
(``xmctag.scoring.evidence``).
"""

from __future__ import annotations

import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import polars as pl

from xmctag.backend import runtime
from xmctag.bundle import Bundle
from xmctag.errors import UserError
from xmctag.incremental import coalesced, merge, reused_products, with_content_hash
from xmctag.io.catalog import CatalogColumns, count_rows, read_batches
from xmctag.io.writers import EVIDENCE_SCHEMA, PRODUCT_SCHEMA, PredictionWriter
from xmctag.label_groups import group_ids
from xmctag.models.prompt import PromptTemplate
from xmctag.models.tokens import clip_text, pad
from xmctag.prefetch import prefetch
from xmctag.progress import Progress
from xmctag.scoring import rank_labels
from xmctag.scoring.thresholds import apply_thresholds, load_thresholds
from xmctag.summary import RunChecks, TagSummary
from xmctag.tagging_run import check_evidence, check_options, tagging_run

ENCODE_BATCH_CPU = 64
ENCODE_BATCH_CUDA = 512
REUSED_ROWS_HELD = 16  # tag --previous: catalog rows (x batch_size) held at most while the changed ones gather


class Tagger:
    """A bundle ready to tag: ONNX session, tokenizer, faiss indexes (labels, training products), label table."""

    graph: str | None = None  # the encoder graph's file name (``load``): recorded with the predictions
    train_ids: np.ndarray | None = None  # the training products' ids, read on the first ``--evidence`` request

    def __init__(self, bundle: Bundle, session, tokenizer, index, labels: pl.DataFrame, device: str,
                 encode_batch_size: int = ENCODE_BATCH_CPU, neighbours=None, exclusive_groups: bool = False,
                 lexical=None, thresholds=None):
        self.bundle = bundle
        self.path, self.manifest, self.config = bundle.path, bundle.manifest, bundle.config
        self.session = session
        self.tokenizer = tokenizer
        self.pad_id = int(self.manifest["tokenization"]["pad_id"])
        self.index = index
        self.label_ids = np.array(labels["label"].to_list(), dtype=object)
        self.label_texts = np.array(labels["text"].to_list(), dtype=object)
        self.device = device
        scoring = self.manifest["scoring"]
        self.scale = float(scoring["scale"])
        self.neighbour_index, self.neighbour_labels = neighbours if neighbours is not None else (None, None)
        self.knn_neighbours = int(scoring.get("knn_neighbours", 0)) if neighbours is not None else 0
        self.knn_temperature = float(scoring.get("knn_temperature", 0.0))
        self.knn_weight = float(scoring.get("knn_weight", 0.0)) if self.knn_neighbours else 0.0
        self.label_vectors = bundle.label_vectors()  # memory-mapped: only candidate rows are read
        # The lexical model and each label's fusion weight (Bundle.lexical), or None: the dense score alone.
        self.lexical, self.lexical_weights = lexical if lexical is not None else (None, None)
        self.encode_batch_size = encode_batch_size
        self.thresholds = thresholds  # calibrated thresholds (L,) (xmctag.calibration), or None: top-k as ranked
        groups = labels["exclusive_group"].to_list() if exclusive_groups and "exclusive_group" in labels else None
        self.groups = group_ids(groups)  # at most one label of each exclusive facet per product
        # A decoder's prompt template (ids built as in training), None for encoders (the tokenizer's own).
        self.prompt: PromptTemplate | None = bundle.prompt()
        fusion = bundle.fusion
        self.catalog = CatalogColumns(self.config.id_col, tuple(self.config.text_cols),
                                      fusion["image_col"] if fusion is not None else None)

    @property
    def bundle_id(self) -> str:
        return self.bundle.bundle_id

    @property
    def fusion(self) -> dict | None:
        """The manifest's ``fusion`` section for a bundle with image fusion, else None (text only)."""
        return self.bundle.fusion

    def images(self, cache_dir: str | Path | None = None, output: Path | None = None, workers: int = 8,
               image_hosts: Sequence[str] = ()):
        """A ``BundleImages`` reading the image cache (``xmctag.vision.tagging.resolve_cache_dir``); ``image_hosts``
        as for ``tag_file``."""
        from xmctag.vision.tagging import BundleImages, resolve_cache_dir

        directory = resolve_cache_dir(cache_dir, self.fusion.get("cache_dir"), output)
        return BundleImages(self.bundle, self.fusion, directory, self.device, workers, image_hosts)

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", threads: int | None = None,
             verify: bool = True, precision: str = "auto", exclusive_groups: bool = False,
             encode_batch_size: int | None = None, calibrated: bool = False) -> "Tagger":
        """``precision``: ``auto`` (fp16 graph on CUDA, fp32 on CPU), ``fp32``, ``fp16`` or ``int8`` (CPU: about
        2x the fp32 graph with AVX-512 VNNI, embeddings within a few degrees of fp32). ``exclusive_groups``: at
        most one label of each exclusive facet per product (``xmctag.label_groups``); False (default) ranks all
        labels freely.
        ``encode_batch_size``: products per ONNX Runtime call (default: 64 on CPU, 512 on CUDA).
        ``calibrated``: keep only labels scoring at least their calibrated threshold (``xmctag calibrate``,
        ``xmctag.calibration``), so products get fewer than ``top_k`` labels or none; a bundle without calibration
        is an error."""
        runtime.check_runtime_packages()  # both or neither of onnxruntime(-gpu) / faiss-cpu(-gpu): say so first
        bundle = Bundle.open(path, verify=verify)
        thresholds = load_thresholds(bundle) if calibrated else None
        requested, device = device, runtime.resolve_device(device)
        try:
            session = bundle.session(device, precision, threads)
        except runtime.CudaUnavailable as e:
            if requested != "auto":  # --device cuda was asked for: a CPU run would not be what the user wanted
                raise
            warnings.warn(f"{e}; tagging on the CPU", stacklevel=2)
            device = "cpu"
            session = bundle.session(device, precision, threads)
        labels = bundle.labels(["label", "text", "exclusive_group"] if exclusive_groups else ["label", "text"])
        index = bundle.label_index(device)
        if exclusive_groups and ("exclusive_group" not in labels
                                 or group_ids(labels["exclusive_group"].to_list()) is None):
            warnings.warn(f"--exclusive-groups: {bundle.path} has no exclusive label groups (training found none, "
                          "or the bundle predates them); all labels are ranked freely", stacklevel=2)
        if encode_batch_size is None:  # a GPU idles on batches of 64; on a CPU larger batches only pad more
            encode_batch_size = ENCODE_BATCH_CUDA if device == "cuda" else ENCODE_BATCH_CPU
        tagger = cls(bundle, session, bundle.tokenizer(), index, labels, device, encode_batch_size,
                     neighbours=bundle.neighbours(), exclusive_groups=exclusive_groups, lexical=bundle.lexical(),
                     thresholds=thresholds)
        tagger.graph = bundle.graph(device, precision).name
        return tagger

    # -- core ----------------------------------------------------------------------------------------------------
    def embed(self, texts: list[str], images: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """``(n, d)`` float32 unit-norm embeddings; batches formed in length order, output in input order.

        ``images``: fused bundles, ``(features (n, M, V), mask (n, M))`` from ``BundleImages.features``; None: no
        product has an image.
        """
        if self.fusion is not None and images is None:
            images = (np.zeros((len(texts), self.fusion["max_images"], self.fusion["vision_dim"]), np.float32),
                      np.zeros((len(texts), self.fusion["max_images"]), np.int64))
        max_length = self.manifest["tokenization"]["max_length"]
        texts = [clip_text(t, max_length) for t in texts]  # a huge title costs its first tokens' worth, as training
        if self.prompt is not None:
            # The tokenizer truncates at max_length, never below the title budget, so these are training's ids.
            has_image = (images[1].sum(axis=1) > 0).tolist() if images is not None else None
            ids = self.prompt.ids(self.tokenizer, texts, max_length, has_image)
        else:
            ids = [e.ids for e in self.tokenizer.encode_batch(texts)]
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
                images: tuple[np.ndarray, np.ndarray] | None = None, evidence: int = 0):
        """Label indices ``(n, k)`` (-1 where below ``min_score`` or, calibrated, below the label's threshold) and
        scores ``(n, k)`` in [0, 1], best first; ``k`` is ``top_k``, at most the number of labels. ``evidence`` > 0:
        a third value, as ``rank``'s."""
        check_options(top_k, min_score)
        if self.lexical is None:
            return self.rank(self.embed(texts, images), top_k, min_score, evidence=evidence)
        # The lexical model runs on a thread of its own while ONNX Runtime encodes (both release the GIL for
        # most of their work), so on a multi-core CPU its cost mostly hides behind the encoder's.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="xmctag-lexical") as pool:
            lexical = pool.submit(self.lexical_candidates, texts)
            embeddings = self.embed(texts, images)
            return self.rank(embeddings, top_k, min_score, lexical.result(), evidence=evidence)

    def lexical_candidates(self, texts: list[str]):
        """The lexical model's candidates, scores and label weights for ``rank`` (None without a lexical model)."""
        if self.lexical is None:
            return None
        top, scores = self.lexical.predict(texts)
        return top, scores, self.lexical_weights

    def rank(self, embeddings: np.ndarray, top_k: int = 5, min_score: float | None = None, lexical=None,
             evidence: int = 0):
        """``predict`` from ``(n, d)`` product embeddings: label-vector and neighbour searches, blend, top-k;
        ``lexical``: ``lexical_candidates`` of the same products (None: the dense score alone). ``evidence`` > 0:
        also the training rows ``(n, min(evidence, knn_neighbours))`` (-1 = none) and similarities that voted most
        for the labels returned (``xmctag.scoring.evidence``), as a third value (bundles with neighbours only)."""
        check_options(top_k, min_score)
        if evidence and not self.knn_neighbours:
            raise UserError(f"--evidence: {self.path} tags without neighbour votes (knn_neighbours 0), so no "
                            "training product votes for a label")
        top_k = min(top_k, len(self.label_ids))  # more would only be -1 padding, and memory grows with batch x k
        votes = None
        if self.knn_neighbours:
            sims, neighbours = self.neighbour_index.search(embeddings, self.knn_neighbours)
            votes = self.neighbour_labels.votes(neighbours, sims, self.knn_temperature)
        indices, scores = rank_labels(embeddings, self.label_vectors, self.scale, self.index.search, votes,
                                      self.knn_weight, top_k, self.groups, lexical=lexical)
        if min_score is not None:
            indices = np.where(scores >= min_score, indices, -1)
        if self.thresholds is not None:
            indices = apply_thresholds(indices, scores, self.thresholds)
        if evidence:
            from xmctag.scoring.evidence import top_evidence

            return indices, scores, top_evidence(self.neighbour_labels, neighbours, sims, self.knn_temperature,
                                                 indices, evidence)
        return indices, scores

    def evidence_ids(self) -> np.ndarray:
        """The training products' ids (row i of the neighbour index -> its id); a ``UserError`` for a bundle
        without neighbours or without ``train_ids.parquet`` (``Bundle.train_ids``)."""
        if self.train_ids is None:
            self.train_ids = self.bundle.train_ids()
        return self.train_ids

    def tag(self, frame: pl.DataFrame, top_k: int = 5, min_score: float | None = None,
            cache_dir: str | Path | None = None, base_dir: str | Path = ".",
            image_hosts: Sequence[str] = (), evidence: int = 0) -> pl.DataFrame:
        """``id``, ``labels``, ``scores`` for the rows of ``frame`` that have an id and text (others are left out);
        ``evidence`` > 0: also ``evidence_ids`` and ``evidence_scores`` (``xmctag.scoring.evidence``).

        Fused bundles read ``frame``'s image column when it has one (relative paths against ``base_dir``;
        ``image_hosts`` as for ``tag_file``).
        """
        check_evidence(evidence)
        if evidence:
            self.evidence_ids()
        self.catalog.check_schema("frame", frame.schema)
        batch = self.catalog.prepare(frame, source="frame")
        images = None
        if self.fusion is not None and "image" in batch.columns:
            images = self.images(cache_dir, image_hosts=image_hosts).features(batch["image"].to_list(),
                                                                              Path(base_dir))
        products = self.tag_prepared(batch, top_k, min_score, images, evidence)
        return products.select("id", "labels", "scores", *(EVIDENCE_SCHEMA if evidence else ()))

    # -- whole files ---------------------------------------------------------------------------------------------
    def tag_file(self, catalog: str | Path, output: str | Path | None = None, top_k: int = 5,
                 fmt: str | None = None, min_score: float | None = None, batch_size: int = 4096, strict: bool = False,
                 progress: bool = True, cache_dir: str | Path | None = None, workers: int = 8,
                 checks: RunChecks | None = None, summary_json: str | Path | None = None,
                 escape_formulas: bool = False, image_hosts: Sequence[str] = (), previous: str | Path | None = None,
                 evidence: int = 0) -> TagSummary:
        """Streams ``catalog`` (Parquet) through the model into ``output``; returns counts and timing.

        ``fmt``: ``parquet``, ``csv`` or ``jsonl``; None: from ``output``'s extension (``.parquet``, ``.csv``,
        ``.jsonl``/``.ndjson``/``.json``), parquet when it has none of those or there is no ``output``. A ``fmt``
        that contradicts a known extension is an error (``xmctag.io.writers.resolve_format``).
        Rows without an id or without text are skipped and counted in ``TagSummary.skipped`` (``strict``: an error
        naming the row). Rows repeating an earlier row's id are tagged like any other (catching them would take
        memory that grows with the catalog; ``xmctag eval`` refuses such a file). ``top_k`` is at most the number
        of labels.

        ``checks`` (``xmctag.summary.RunChecks``; default: a run that tags nothing, or whose every image fails,
        fails): a run that fails them raises ``ThresholdError`` and writes no output. ``summary_json``: where to
        write the run's summary, however it ends (``xmctag.summary.run_summary``). The output is written through
        ``xmctag.io.atomic`` (one run per output, complete or absent); its provenance (bundle, xmctag version,
        catalog and its sha256, time) is in the Parquet metadata, or for CSV/JSONL in ``<output>.meta.json``.

        Fused bundles: ``cache_dir`` is the image-embedding cache (default: the bundle's, see
        ``xmctag.vision.tagging.resolve_cache_dir``), ``workers`` the threads that read and decode new pictures.
        Image URLs reach public addresses only, and the hosts, addresses and CIDR networks of ``image_hosts``
        (``xmctag.vision.netguard``).

        ``previous``: last night's prediction file (any format ``tag`` writes): products whose content hash and id
        are there, written by the same bundle with the same settings, are copied from it instead of tagged
        (``xmctag.incremental``; ``TagSummary.incremental`` counts them). ``evidence``: per product, the training
        products that voted most for its labels, at most this many (``xmctag.scoring.evidence``; 0: off).
        """
        catalog = Path(catalog)
        with tagging_run(self, catalog, [catalog], output, top_k=top_k, fmt=fmt, min_score=min_score, checks=checks,
                         summary_json=summary_json, escape_formulas=escape_formulas, evidence=evidence,
                         previous=previous) as run:
            self._tag_into(run.writer, catalog, run.columns, run.summary, run.top_k, min_score, batch_size, strict,
                           progress, cache_dir, workers, tuple(image_hosts), evidence, run.previous)
        return run.summary

    def output_settings(self, evidence: int, escape_formulas: bool) -> dict:
        """Settings recorded with the predictions besides the bundle, top_k, min_score and text columns: with
        those, what ``tag --previous`` compares (``xmctag.incremental``)."""
        from xmctag.incremental import CONTENT_HASH

        calibrated = self.bundle.manifest["calibration"]["target_precision"] if self.thresholds is not None else None
        return {"graph": self.graph, "exclusive_groups": self.groups is not None, "evidence": evidence,
                "calibrated_precision": calibrated, "content_hash": CONTENT_HASH, "escape_formulas": escape_formulas}

    def _tag_into(self, writer: PredictionWriter, catalog: Path, columns: list[str], summary: TagSummary,
                  top_k: int, min_score: float | None, batch_size: int, strict: bool, progress: bool,
                  cache_dir: str | Path | None, workers: int, image_hosts: tuple[str, ...], evidence: int = 0,
                  previous=None) -> None:
        total = count_rows(catalog)
        show = Progress(progress)
        started = time.perf_counter()
        images = self.images(cache_dir, summary.output, workers, image_hosts) if self.fusion is not None else None
        label_table = (pl.Series(self.label_ids.tolist(), dtype=pl.String),  # reused rows' label texts
                       pl.Series(self.label_texts.tolist(), dtype=pl.String)) if previous is not None else None

        incremental = previous is not None and previous.counts.used

        def split():
            """(rows read, rows to tag, rows skipped by reason, rows reused or None, first row) per catalog batch."""
            rows = 0
            for frame in read_batches(catalog, columns, batch_size):
                batch, skipped = self.prepare_batch(frame, str(catalog), rows, strict)
                reused = None
                if incremental:  # only the rows not reused are tagged
                    batch, reused = previous.split(batch)
                yield len(frame), batch, skipped, reused, rows
                rows += len(frame)

        def prepared():
            """(rows read, rows to tag, rows skipped by reason, their image inputs or None, rows reused or None)."""
            parts = coalesced(split(), batch_size, REUSED_ROWS_HELD * batch_size) if incremental else split()
            for n_read, batch, skipped, reused, row0 in parts:
                features = None
                # A catalog without the image column is tagged text only (``embed`` masks every image slot).
                if images is not None and len(batch) and "image" in batch.columns:
                    features = images.features(batch["image"].to_list(), catalog.parent, row0=row0)
                yield n_read, batch, skipped, features, reused

        # Fused: the image work (cache lookups, decoding, vision graph) runs a batch ahead in a background thread.
        batches = prepared() if images is None else prefetch(prepared(), name="xmctag-images")
        with show.task("tagging", total=total, unit="products") as update:
            for n_read, batch, skipped, features, reused in batches:
                products = self.tag_prepared(batch, top_k, min_score, features, evidence) if len(batch) else None
                if reused is not None and len(reused):
                    reused = reused_products(reused, *label_table)
                    products = merge(products, reused) if products is not None else reused.drop("_pos")
                elif products is not None and "_pos" in products.columns:
                    products = products.drop("_pos")
                if products is not None:
                    writer.write_frame(products)
                summary.add_batch(n_read, skipped, products)
                if images is None:
                    update(n_read)
                else:
                    rate = images.slots_seen / max(time.perf_counter() - started, 1e-9)
                    update(n_read, **{"images/s": f"{rate:,.0f}"})
        summary.seconds = time.perf_counter() - started
        if images is not None:
            summary.images, summary.image_cache = images.counts.to_dict(), images.cache_dir

    def prepare_batch(self, frame: pl.DataFrame, source: str, row_offset: int = 0,
                      strict: bool = False) -> tuple[pl.DataFrame, dict[str, int]]:
        """A batch of catalog rows (``source`` and ``row_offset``: where they come from, for ``strict``'s error)
        -> the rows to tag (``id``, ``text``, ``content_hash``, and ``image``) and the rows skipped, by reason."""
        skipped: dict[str, int] = {}
        batch = self.catalog.prepare(frame, source=source, row_offset=row_offset, strict=strict, skipped=skipped)
        return with_content_hash(batch, self.fusion is not None), skipped

    def tag_prepared(self, batch: pl.DataFrame, top_k: int, min_score: float | None, images=None,
                     evidence: int = 0) -> pl.DataFrame:
        """Writer rows (``xmctag.io.writers.PRODUCT_SCHEMA``, and the evidence columns) of a batch from
        ``prepare_batch``; ``images``: its image inputs (``BundleImages.features``) or None; its ``_pos`` column,
        when it has one, is kept."""
        found = self.predict(batch["text"].to_list(), top_k, min_score, images, evidence=evidence)
        indices, scores = found[0], found[1]
        keep = indices >= 0
        columns = {"id": batch["id"],
                   "labels": [self.label_ids[row[k]].tolist() for row, k in zip(indices, keep)],
                   "label_texts": [self.label_texts[row[k]].tolist() for row, k in zip(indices, keep)],
                   "scores": [s[k].tolist() for s, k in zip(scores, keep)],
                   "content_hash": batch["content_hash"] if "content_hash" in batch.columns else [None] * len(batch)}
        schema = dict(PRODUCT_SCHEMA)
        if evidence:
            rows, sims = found[2]
            ids, present = self.evidence_ids(), rows >= 0
            columns.update(evidence_ids=[ids[r[p]].tolist() for r, p in zip(rows, present)],
                           evidence_scores=[s[p].tolist() for s, p in zip(sims, present)])
            schema.update(EVIDENCE_SCHEMA)
        if "_pos" in batch.columns:
            columns["_pos"], schema["_pos"] = batch["_pos"], pl.UInt32
        return pl.DataFrame(columns, schema=schema)

