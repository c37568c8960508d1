"""A bundle's two searches, exact or approximate: chosen by size at export, measured on real rows, searched at tagging.

Two searches, each chosen by its own number of rows:

- **labels**: maximum inner product of queries ``[q, 1]`` over the rows ``[w_l, b_l]`` of ``label_vectors.npy``
  (not normalised). It only has to find the candidates: ``xmctag.scoring.ranking.rank_labels`` asks for
  ``label_vector_candidates(k)`` of them, and an approximate search here returns their exact logits (the candidates'
  rows of ``label_vectors.npy``, re-scored, see ``RefinedSearch``).
- **neighbours**: inner product (cosine) of ``q`` over the training products' unit-norm embeddings (kNN votes).

Kinds (``export --index``; ``auto``: ``exact`` below ``exact_below`` rows, ``ivf`` from there on; by default
``EXACT_BELOW`` labels and ``NEIGHBOUR_EXACT_BELOW`` training products: the exact neighbour search, faiss's
``IndexFlatIP``, costs about 3x the exact label search per row, see bench/RESULTS.md, "Approximate indexes"):

- ``exact``: the label search has no file of its own: it runs over the memory-mapped ``label_vectors.npy``
  (``ExactSearch``: chunked matrix product + ``argpartition``; the results of the ``IndexFlatIP`` in ``labels.faiss``
  of earlier bundles up to float rounding, without a second copy of the matrix). The neighbour search is
  ``neighbours.faiss``, an ``IndexFlatIP`` (where the training embeddings are stored, once).
- ``ivf``: ``labels.faiss`` / ``neighbours.faiss`` hold a faiss ``IndexIVFScalarQuantizer`` (inner-product metric,
  ``nlist`` = 2 sqrt(rows) k-means cells; codes ``sq8`` for the labels, whose candidates are re-scored exactly from
  ``label_vectors.npy`` and whose rows are zero-padded from d + 1 to a multiple of 8 (``padded_dim``: the SIMD
  kernels), ``fp16`` for the neighbours, whose similarities weigh the votes). Export measures its recall
  against exact search on real rows and tunes ``nprobe`` (powers of 2, at most ``max_nprobe``) to the smallest that
  reaches the floor; if none does, the bundle gets the exact search and a warning, and the manifest says why.

Recall, measured at export on up to ``MAX_QUERIES`` real rows (the run's training product embeddings,
``train_embeddings.npy``; a run without them: its label-text embeddings), against exact search:

- labels: ``candidates@C`` (the share of the exact top-C label-vector candidates found, C =
  ``label_vector_candidates(5)``) and ``top@5`` (the share of the exact top 5 of the label-vector ranking, without
  neighbour votes, that the approximate ranking keeps); the floor applies to both;
- neighbours: ``neighbours@k``, ``k`` = knn_neighbours, each query's own row left out (it is a training product).

The manifest's ``index`` section (covered by the bundle id: nprobe changes results), one entry per search,
``labels`` and, with neighbours, ``neighbours``::

    {"kind": "exact" | "ivf", "requested": "auto" | "exact" | "ivf", "rows": int, "exact_below": int,
     "floor": float in (0, 1], "queries": int, "recall": {name: float in [0, 1]} | null, "fallback": str | null,
     ivf only: "nlist": int, "nprobe": int in [1, nlist], "storage": "sq8" | "fp16", "refine": int >= 1}

``refine``: the label search fetches ``refine x`` the candidates asked for and keeps the best by exact logit.
A bundle without the section (before 2026-12-03) has an exact ``labels.faiss`` and is searched as before.
"""

from __future__ import annotations

import math
import time
import warnings

import numpy as np

KINDS = ("exact", "ivf")
REQUESTS = ("auto", *KINDS)
STORAGES = {"sq8": "QT_8bit", "fp16": "QT_fp16"}
EXACT_BELOW = 50_000  # labels: exact search costs up to about 1 ms a product (a third of MiniLM's encoder) below it
NEIGHBOUR_EXACT_BELOW = 20_000  # training products: likewise (IndexFlatIP: about 0.08 ms a product per 1,000 rows)
RECALL_FLOOR = 0.98
MAX_QUERIES = 1000
REFINE = 2
REFINE_CHUNK = 256  # queries whose candidates are re-scored at once
TRAIN_PER_CELL = 40  # k-means training rows per IVF cell (faiss warns below 39)
KMEANS_ITERATIONS = 10
EXACT_CHUNK_CELLS = 1 << 25  # query x row scores held at once by the exact search (128 MiB, 256 MiB of ids)


def faiss():
    from xmctag.backend import runtime

    return runtime.faiss()


def check_settings(kind: str, exact_below: int | None, floor: float, max_nprobe: int | None) -> None:
    """A ``UserError`` for an ``--index`` / ``--exact-below`` / ``--recall-floor`` / cap that makes no sense."""
    from xmctag.errors import UserError

    if kind not in REQUESTS:
        raise UserError(f"--index must be one of {', '.join(REQUESTS)}, not {kind!r}")
    if exact_below is not None and exact_below < 0:
        raise UserError(f"--exact-below must be >= 0 rows, not {exact_below}")
    if not 0.0 < floor <= 1.0:  # also refuses nan
        raise UserError(f"--recall-floor must be in (0, 1], not {floor}")
    if max_nprobe is not None and max_nprobe < 1:
        raise UserError(f"the nprobe cap must be >= 1, not {max_nprobe}")


# -- searching ------------------------------------------------------------------------------------------------------
class ExactSearch:
    """Exact inner-product search over a (memory-mapped) float32 matrix: ``search(queries, k) -> (scores, rows)``
    as ``IndexFlatIP.search`` (scores best first, -1 rows past the matrix's), without copying the matrix into an
    index: a chunked matrix product and ``argpartition`` (2-3x faiss's ``knn_inner_product`` on 2 cores, the same
    top-k up to ties within float rounding: bench/RESULTS.md, "Approximate indexes")."""

    def __init__(self, matrix: np.ndarray):
        self.matrix = matrix
        self.ntotal, self.d = matrix.shape

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        n, kept = len(queries), min(k, self.ntotal)
        scores = np.full((n, k), -np.finfo(np.float32).max, np.float32)
        top = np.full((n, k), -1, np.int64)
        chunk = max(1, min(256, EXACT_CHUNK_CELLS // max(self.ntotal, 1)))
        for start in range(0, n, chunk):
            negated = queries[start:start + chunk] @ self.matrix.T
            np.negative(negated, out=negated)
            part = np.argpartition(negated, kept - 1, axis=1)[:, :kept] if kept < self.ntotal else \
                np.broadcast_to(np.arange(self.ntotal), negated.shape)
            values = np.take_along_axis(negated, part, axis=1)
            order = np.argsort(values, axis=1, kind="stable")
            top[start:start + chunk, :kept] = np.take_along_axis(part, order, axis=1)
            scores[start:start + chunk, :kept] = -np.take_along_axis(values, order, axis=1)
        return scores, top


class RefinedSearch:
    """An approximate label search whose candidates get their exact logits: fetches ``refine * k`` rows from the
    faiss ``index`` (whose rows may be zero-padded, ``padded_dim``), scores them on ``matrix`` (``[w_l, b_l]``
    rows), keeps the best ``k``."""

    def __init__(self, index, matrix: np.ndarray, refine: int = REFINE):
        self.index, self.matrix, self.refine = index, matrix, refine
        self.ntotal, self.d = matrix.shape

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        fetch = min(self.refine * k, self.ntotal)
        _, found = self.index.search(padded(queries, self.index.d), fetch)
        scores = np.full(found.shape, -np.inf, dtype=np.float32)
        for start in range(0, len(found), REFINE_CHUNK):  # bounded temporaries: (chunk, fetch, d + 1) floats
            part = found[start:start + REFINE_CHUNK]
            needed = np.unique(part[part >= 0])  # sorted: a memory map is read in order, each row once
            if not len(needed):
                continue
            vectors = np.asarray(self.matrix[needed], dtype=np.float32)[np.searchsorted(needed, np.maximum(part, 0))]
            logits = np.matmul(vectors, queries[start:start + REFINE_CHUNK, :, None])[..., 0]
            scores[start:start + REFINE_CHUNK] = np.where(part >= 0, logits, -np.inf)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        top = np.take_along_axis(found, order, axis=1)
        top_scores = np.take_along_axis(scores, order, axis=1)
        top[~np.isfinite(top_scores)] = -1
        if top.shape[1] < k:  # fewer rows than asked: pad as faiss does
            pad = k - top.shape[1]
            top = np.hstack([top, np.full((len(top), pad), -1, np.int64)])
            top_scores = np.hstack([top_scores, np.full((len(top), pad), -np.inf, np.float32)])
        return top_scores, top


def set_nprobe(index, nprobe: int) -> None:
    faiss().extract_index_ivf(index).nprobe = int(nprobe)


def ivf_shape(index) -> tuple[int, str] | None:
    """``(nlist, storage)`` of a faiss IVF scalar-quantizer inner-product index, None for anything else."""
    f = faiss()
    try:
        ivf = f.extract_index_ivf(index)
    except RuntimeError:
        return None
    ivf = f.downcast_index(ivf)
    if not isinstance(ivf, f.IndexIVFScalarQuantizer) or ivf.metric_type != f.METRIC_INNER_PRODUCT:
        return None
    names = {getattr(f.ScalarQuantizer, qtype): name for name, qtype in STORAGES.items()}
    storage = names.get(ivf.sq.qtype)
    return (int(ivf.nlist), storage) if storage else None


# -- building and measuring -----------------------------------------------------------------------------------------
def nlist_for(rows: int) -> int:
    """IVF cells for ``rows`` rows: 2 sqrt(rows), at most rows / 39 (faiss's fewest training rows per cell)."""
    return max(1, min(int(2 * math.sqrt(rows)), rows // 39))


def padded_dim(d: int) -> int:
    """``d`` rounded up to a multiple of 8: faiss's SIMD scalar-quantizer kernels need it (385 = 384 + the bias
    column would take the scalar path, 9x slower: bench/RESULTS.md, "Approximate indexes")."""
    return -(-d // 8) * 8


def padded(rows: np.ndarray, d: int) -> np.ndarray:
    """``rows`` as contiguous float32 with zero columns up to ``d`` (inner products unchanged)."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if rows.shape[1] == d:
        return rows
    return np.hstack([rows, np.zeros((len(rows), d - rows.shape[1]), np.float32)])


def build_ivf(matrix: np.ndarray, storage: str, nlist: int, seed: int = 0, pad: bool = False):
    """A trained and filled ``IndexIVFScalarQuantizer`` (inner product) over ``matrix`` (float32, may be a map);
    ``pad``: its rows padded with zero columns to ``padded_dim`` (queries must be padded alike)."""
    f = faiss()
    rows, d = matrix.shape
    d = padded_dim(d) if pad else d
    quantizer = f.IndexFlatIP(d)
    index = f.IndexIVFScalarQuantizer(quantizer, d, nlist, getattr(f.ScalarQuantizer, STORAGES[storage]),
                                      f.METRIC_INNER_PRODUCT)
    index.own_fields = True
    quantizer.this.disown()
    index.cp.seed = seed
    index.cp.max_points_per_centroid = TRAIN_PER_CELL
    index.cp.niter = KMEANS_ITERATIONS
    sample = np.sort(np.random.default_rng(seed).choice(rows, size=min(rows, TRAIN_PER_CELL * nlist),
                                                        replace=False))
    index.train(padded(matrix[sample], d))
    for start in range(0, rows, 65536):
        index.add(padded(matrix[start:start + 65536], d))
    return index


def overlap(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of each row's ``exact`` ids (-1 = none) that ``found`` holds."""
    hits = total = 0
    for f_row, e_row in zip(found, exact):
        e_row = e_row[e_row >= 0]
        hits += len(np.intersect1d(f_row[f_row >= 0], e_row))
        total += len(e_row)
    return hits / total if total else 1.0


def label_results(queries: np.ndarray, vectors: np.ndarray, scale: float, search) -> tuple[np.ndarray, np.ndarray]:
    """``search``'s top ``label_vector_candidates(5)`` labels of ``[queries, 1]``, and the top 5 of the
    label-vector ranking built on them (``rank_labels`` without neighbour votes)."""
    from xmctag.scoring.ranking import label_vector_candidates, rank_labels

    pool = min(label_vector_candidates(5), len(vectors))
    q1 = np.hstack([queries, np.ones((len(queries), 1), np.float32)])
    return search.search(q1, pool)[1], rank_labels(queries, vectors, scale, search.search, None, 0.0, 5)[0]


def label_recall(queries: np.ndarray, vectors: np.ndarray, scale: float, exact, approx) -> dict[str, float]:
    """``candidates@C`` and ``top@5`` of the ``approx`` label search against ``exact`` (module docstring):
    ``exact`` is a search or its ``label_results``."""
    truth = exact if isinstance(exact, tuple) else label_results(queries, vectors, scale, exact)
    found = label_results(queries, vectors, scale, approx)
    return {f"candidates@{truth[0].shape[1]}": round(overlap(found[0], truth[0]), 4),
            f"top@{min(5, len(vectors))}": round(overlap(found[1], truth[1]), 4)}


def neighbour_recall(queries: np.ndarray, rows: np.ndarray, exact, approx, k: int) -> dict[str, float]:
    """``neighbours@k`` of ``approx`` against ``exact`` (a search, or its ``search(queries, k + 1)`` rows), each
    query's own row (``rows``) left out."""
    def without_self(found):
        out = np.full((len(found), k), -1, np.int64)
        for i, (row, own) in enumerate(zip(found, rows)):
            kept = row[row != own][:k]
            out[i, :len(kept)] = kept
        return out

    n = min(k + 1, approx.ntotal)
    truth = without_self(exact if isinstance(exact, np.ndarray) else exact.search(queries, n)[1])
    found = without_self(approx.search(queries, n)[1])
    return {f"neighbours@{k}": round(overlap(found, truth), 4)}


def choose(name: str, matrix: np.ndarray, measure, requested: str, exact_below: int, floor: float,
           storage: str, max_nprobe: int | None, n_queries: int, log=print, refine: int | None = None):
    """``(faiss index or None for exact, manifest entry)`` for the search ``name`` over ``matrix``: the kind
    ``requested`` (``auto``: by size), an IVF's ``nprobe`` tuned by ``measure(index) -> {recall name: value}`` to
    reach ``floor`` (each value), exact with a warning when it cannot (module docstring)."""
    rows = len(matrix)
    entry = {"kind": "exact", "requested": requested, "rows": rows, "exact_below": exact_below, "floor": floor,
             "queries": 0, "recall": None, "fallback": None}
    if requested == "exact" or (requested == "auto" and rows < exact_below):
        return None, entry
    nlist = nlist_for(rows)
    started = time.perf_counter()
    index = build_ivf(matrix, storage, nlist, pad=refine is not None)
    log(f"{name} index: IVF {nlist} cells, {storage} codes over {rows:,} rows built in "
        f"{time.perf_counter() - started:.0f} s; tuning nprobe on {n_queries} real rows")
    cap = min(nlist, max_nprobe or nlist)
    nprobe, recall = 1, None
    while True:
        set_nprobe(index, nprobe)
        recall = measure(index)
        if min(recall.values()) >= floor or nprobe >= cap:
            break
        nprobe = min(2 * nprobe, cap)
    entry.update(queries=n_queries, recall=recall)
    if min(recall.values()) < floor:
        entry["fallback"] = (f"ivf (nlist {nlist}, {storage}) reached recall {recall} at nprobe {nprobe} (the "
                             f"most tried), below the floor {floor}: exact search instead")
        warnings.warn(f"{name} index: {entry['fallback']}", stacklevel=2)
        return None, entry
    entry.update(kind="ivf", nlist=nlist, nprobe=nprobe, storage=storage)
    if refine is not None:
        entry["refine"] = refine
    log(f"{name} index: ivf nprobe {nprobe}/{nlist}, recall {recall} (floor {floor})")
    return index, entry


def query_sample(queries: np.ndarray, n: int = MAX_QUERIES, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n`` rows of ``queries`` (a map is read once, in order): ``(rows, their row numbers)``."""
    rows = np.sort(np.random.default_rng(seed).choice(len(queries), size=min(n, len(queries)), replace=False))
    return np.ascontiguousarray(queries[rows], dtype=np.float32), rows


def label_index(vectors: np.ndarray, queries: np.ndarray, scale: float, requested: str = "auto",
                exact_below: int | None = None, floor: float = RECALL_FLOOR, max_nprobe: int | None = None,
                log=print):
    """The label search for ``vectors`` ``(L, d + 1)``: ``(faiss index or None for exact, manifest entry)``;
    ``queries``: real product embeddings ``(n, d)`` (unit norm) to measure recall on."""
    sample, _ = query_sample(queries)
    truth = []  # the exact results, computed once (for an approximate index only)

    def measure(index) -> dict[str, float]:
        if not truth:
            truth.append(label_results(sample, vectors, scale, ExactSearch(vectors)))
        return label_recall(sample, vectors, scale, truth[0], RefinedSearch(index, vectors, REFINE))

    exact_below = EXACT_BELOW if exact_below is None else exact_below
    return choose("label", vectors, measure, requested, exact_below, floor, "sq8", max_nprobe, len(sample), log,
                  refine=REFINE)


def neighbour_index(embeddings: np.ndarray, k: int, requested: str = "auto", exact_below: int | None = None,
                    floor: float = RECALL_FLOOR, max_nprobe: int | None = None, log=print):
    """The neighbour search over the training products' ``embeddings``: ``(faiss index, manifest entry)`` (an
    ``IndexFlatIP`` for exact); recall measured with training products as queries, their own rows left out."""
    sample, rows = query_sample(embeddings)
    truth = []

    def measure(index) -> dict[str, float]:
        if not truth:
            truth.append(ExactSearch(embeddings).search(sample, min(k + 1, len(embeddings)))[1])
        return neighbour_recall(sample, rows, truth[0], index, k)

    exact_below = NEIGHBOUR_EXACT_BELOW if exact_below is None else exact_below
    index, entry = choose("neighbour", embeddings, measure, requested, exact_below, floor, "fp16", max_nprobe,
                          len(sample), log)
    if index is None:
        index = faiss().IndexFlatIP(embeddings.shape[1])
        for start in range(0, len(embeddings), 65536):
            index.add(np.ascontiguousarray(embeddings[start:start + 65536], dtype=np.float32))
    return index, entry


# -- reading --------------------------------------------------------------------------------------------------------
def entry_problem(entry) -> str | None:
    """What is wrong with a manifest ``index`` entry (None: nothing): ``.key`` of the first key missing or out of
    range, ``""`` for an entry that is not an object. (Its rows are checked against the files when they are read.)"""
    def integer(v, low):
        return isinstance(v, int) and not isinstance(v, bool) and v >= low

    def number(v, low, high, open_low=False):
        return (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                and (v > low if open_low else v >= low) and v <= high)

    if not isinstance(entry, dict):
        return ""
    checks = {"kind": lambda v: v in KINDS, "requested": lambda v: v in REQUESTS,
              "rows": lambda v: integer(v, 0), "exact_below": lambda v: integer(v, 0),
              "floor": lambda v: number(v, 0, 1, open_low=True), "queries": lambda v: integer(v, 0),
              "recall": lambda v: v is None or (isinstance(v, dict) and all(
                  isinstance(key, str) and number(x, 0, 1) for key, x in v.items())),
              "fallback": lambda v: v is None or isinstance(v, str)}
    if entry.get("kind") == "ivf":
        checks.update(nlist=lambda v: integer(v, 1) and integer(entry.get("rows"), 0) and v <= entry["rows"],
                      nprobe=lambda v: integer(v, 1) and integer(entry.get("nlist"), 1) and v <= entry["nlist"],
                      storage=lambda v: v in STORAGES, recall=lambda v: isinstance(v, dict) and bool(v) and all(
                          isinstance(key, str) and number(x, 0, 1) for key, x in v.items()))
        if "refine" in entry:
            checks["refine"] = lambda v: integer(v, 1) and v <= 64
    for key, check in checks.items():
        if key not in entry or not check(entry[key]):
            return f".{key}"
    return None
