"""Labels added to a trained model without retraining (``xmctag relabel``): their label vectors, and the training
products that vote for them. Numpy only (tagging's dependencies: no torch).

**Vectors.** A trained label l has a text embedding ``e_l`` (what the encoder made of its text) and a label vector
``[w_l, b_l]`` (``xmctag.scoring.LabelVectors``), fitted from ``e_l`` on the products that carry it. A new label has
only its text, embedded by the same encoder; ``VectorMap`` maps ``[e, 1]`` to ``[w, b]`` so that the new vectors sit
with the trained ones (same norms, biases, score levels). It is fitted on the trained labels that had training
products (least squares, numpy):

- ``text``: ``[e, 0]``, the plain dual-encoder score (``LabelVectors.from_text_embeddings``);
- ``scaled``: ``[a e, c]``, one scale ``a`` and one bias ``c`` for every label (what training's label-vector stage
  gives a label it never saw);
- ``ridge``: ``[a e, c] + [e, 1] B``, a ``(d + 1) x (d + 1)`` linear correction fitted by ridge regression on the
  residuals of ``scaled`` (so a strong penalty falls back to ``scaled``), its penalty chosen on a held-out fifth of
  the labels (mean squared error of ``[w, b]``).

**Neighbour votes.** A trained label also gets votes from the training products near a product (the kNN part of
the dense score, ``xmctag.scoring.ranking``); a new label has no training product, so its dense score would be at
most ``1 - knn_weight`` of a trained label's. ``pseudo_labels`` gives each new label the training products whose
logit ``<[q, 1], [w, b]>`` under its mapped vector passes a threshold, and ``calibrate_threshold`` picks that
threshold so that the trained labels' mapped vectors would give their labels as many products as they really have.

**Refit** (optional). The products voting for a new label say more about it than its text: ``label_centroids`` gives
each label the normalised mean embedding of its products, and ``fit_vector_map(..., extra=centroids)`` a ridge map
from ``[e, centroid, 1]`` to ``[w, b]``, fitted on the trained labels (with their own products) and applied to the
new labels (with the products voting for them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

METHODS = ("ridge", "scaled", "text")
RIDGE_PENALTIES = (0.01, 0.1, 1.0, 10.0, 100.0)  # in units of the mean squared norm of a label embedding
CHUNK = 16384  # training products scored at once


@dataclass
class VectorMap:
    """``[e, extra, 1] @ matrix`` -> ``[w, b]`` (``extra``: more features per label, e.g. ``label_centroids``;
    none by default); ``method`` one of ``METHODS``, ``penalty`` ridge's (None otherwise)."""

    method: str
    matrix: np.ndarray  # (d + f + 1, d + 1) float64
    penalty: float | None = None

    def apply(self, embeddings: np.ndarray, extra: np.ndarray | None = None) -> np.ndarray:
        """``(n, d + 1)`` float32 label vectors ``[w, b]`` of text embeddings ``(n, d)`` (and ``extra`` ``(n, f)``,
        as fitted)."""
        return (_features(embeddings, extra) @ self.matrix).astype(np.float32)

    def describe(self) -> dict:
        """What the manifest records: the method, ridge's penalty, ``scaled``'s scale and bias."""
        d = self.matrix.shape[1] - 1
        out = {"method": self.method, "scale": float(np.trace(self.matrix[:d, :d]) / d),
               "bias": float(self.matrix[-1, d])}
        if self.penalty is not None:
            out["penalty"] = self.penalty
        return out


def _features(embeddings: np.ndarray, extra: np.ndarray | None) -> np.ndarray:
    parts = [np.asarray(embeddings, dtype=np.float64)]
    if extra is not None:
        parts.append(np.asarray(extra, dtype=np.float64))
    return np.hstack([*parts, np.ones((len(embeddings), 1))])


def fit_vector_map(embeddings: np.ndarray, vectors: np.ndarray, counts: np.ndarray, method: str = "ridge",
                   seed: int = 0, extra: np.ndarray | None = None) -> VectorMap:
    """The map from text embeddings ``(L, d)`` (and ``extra`` ``(L, f)``, ridge only) to label vectors ``(L, d +
    1)``, fitted on the labels with ``counts > 0`` (training products); see the module docstring."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    e = np.asarray(embeddings, dtype=np.float64)
    y = np.asarray(vectors, dtype=np.float64)
    d = e.shape[1]
    if method == "text":
        matrix = np.zeros((d + 1, d + 1))
        matrix[:d, :d] = np.eye(d)
        return VectorMap(method, matrix)
    fit = np.asarray(counts) > 0
    if fit.sum() < 2:
        fit = np.ones(len(e), dtype=bool)
    x = _features(e, extra)[fit]
    e, y = e[fit], y[fit]
    scale = float((e * y[:, :d]).sum() / max((e * e).sum(), 1e-12))
    bias = float(y[:, d].mean())
    base = np.zeros((x.shape[1], d + 1))  # [a e, c]: extra features get no weight
    base[:d, :d] = scale * np.eye(d)
    base[-1, d] = bias
    if method == "scaled":
        return VectorMap(method, base)
    residual = y - x @ base
    rng = np.random.default_rng(seed)
    held = rng.random(len(x)) < 0.2
    if held.all() or not held.any():
        held = np.zeros(len(x), dtype=bool)
    unit = float((x[:, :-1] ** 2).sum(axis=1).mean())  # penalties in units of a label's squared feature norm
    best = None
    for penalty in RIDGE_PENALTIES:
        if not held.any():
            best = (0.0, penalty)
            break
        correction = _ridge(x[~held], residual[~held], penalty * unit)
        error = float(((x[held] @ correction - residual[held]) ** 2).mean())
        if best is None or error < best[0]:
            best = (error, penalty)
    penalty = best[1]
    return VectorMap(method, base + _ridge(x, residual, penalty * unit), penalty)


def label_centroids(rows: np.ndarray, labels: np.ndarray, n_labels: int, products, n_products: int) -> np.ndarray:
    """``(n_labels, d)``: the normalised mean embedding of each label's training products (the ``(rows, labels)``
    pairs; zeros for a label without any); ``products(start, stop)`` as for ``product_logits``."""
    order = np.argsort(rows, kind="stable")
    rows, labels = np.asarray(rows)[order], np.asarray(labels)[order]
    out = None
    for start in range(0, n_products, CHUNK):
        q = np.asarray(products(start, min(start + CHUNK, n_products)), dtype=np.float64)
        if out is None:
            out = np.zeros((n_labels, q.shape[1]))
        lo, hi = np.searchsorted(rows, [start, start + len(q)])
        np.add.at(out, labels[lo:hi], q[rows[lo:hi] - start])
    if out is None:
        return np.zeros((n_labels, 0))
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def _ridge(x: np.ndarray, y: np.ndarray, penalty: float) -> np.ndarray:
    """``argmin_B |x B - y|^2 + penalty |B without its last (intercept) row|^2``."""
    gram = x.T @ x
    reg = np.full(len(gram), penalty)
    reg[-1] = 0.0
    return np.linalg.solve(gram + np.diag(reg) + 1e-9 * np.eye(len(gram)), x.T @ y)


def _at_least(rows, labels, values, threshold: float, floor: int, m: int):
    """The (row, label) pairs above ``threshold``, and each label's best ``floor`` pairs, each pair once."""
    _, first = np.unique(labels.astype(np.int64) * (int(rows.max()) + 1) + rows, return_index=True)
    rows, labels, values = rows[first], labels[first], values[first]
    order = np.lexsort((-values, labels))
    rank = np.arange(len(order)) - np.searchsorted(labels[order], np.arange(m))[labels[order]]
    keep = np.zeros(len(order), dtype=bool)
    keep[order] = (values[order] > threshold) | (rank < floor)
    return rows[keep], labels[keep], values[keep]


def product_logits(products, n_products: int, vectors: np.ndarray):
    """Yields ``(start, logits (rows, m))``: ``<[q, 1], [w, b]>`` of the training products ``q`` and the ``m``
    label vectors, ``CHUNK`` products at a time; ``products(start, stop)`` returns rows ``start:stop``."""
    d = vectors.shape[1] - 1
    w, b = np.asarray(vectors[:, :d], dtype=np.float32), np.asarray(vectors[:, d], dtype=np.float32)
    for start in range(0, n_products, CHUNK):
        q = np.asarray(products(start, min(start + CHUNK, n_products)), dtype=np.float32)
        yield start, q @ w.T + b


def calibrate_threshold(products, n_products: int, mapped: np.ndarray, true_counts: np.ndarray) -> float:
    """The logit threshold at which the mapped vectors ``mapped`` ``(m, d + 1)`` of trained labels would give
    those labels, in total, as many training products as they have (``true_counts`` ``(m,)``)."""
    total = int(np.sum(true_counts))
    if total == 0 or n_products == 0:
        return 0.0
    # The total-th largest logit: keep each chunk's best `total` values, then the best among those.
    best = np.empty(0, dtype=np.float32)
    for _, logits in product_logits(products, n_products, mapped):
        values = np.concatenate([best, logits.ravel()])
        best = values if len(values) <= total else np.partition(values, len(values) - total)[-total:]
    return float(best.min())


def pseudo_labels(products, n_products: int, vectors: np.ndarray, threshold: float, cap: int, floor: int = 0
                  ) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, labels)``: for each of the ``m`` new labels (``vectors`` ``(m, d + 1)``), the training products
    whose logit exceeds ``threshold``, at most ``cap`` of them (the highest) and at least ``floor`` (the highest,
    whatever their logit), as int64 arrays sorted by row."""
    if cap <= 0 or len(vectors) == 0 or n_products == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    floor = min(floor, cap, n_products)
    rows, labels, values = [], [], []
    for start, logits in product_logits(products, n_products, vectors):
        r, lab = np.nonzero(logits > threshold)
        if floor:  # each chunk's best `floor` per label: the best `floor` overall are among them
            f = min(floor, len(logits))
            best = np.argpartition(-logits, f - 1, axis=0)[:f]
            r, lab = np.concatenate([r, best.ravel()]), np.concatenate([lab, np.tile(np.arange(len(vectors)), f)])
        rows.append(r + start)
        labels.append(lab)
        values.append(logits[r, lab])
    rows, labels, values = np.concatenate(rows), np.concatenate(labels), np.concatenate(values)
    if floor:
        rows, labels, values = _at_least(rows, labels, values, threshold, floor, len(vectors))
    # At most `cap` per label: by label, best first.
    order = np.lexsort((-values, labels))
    rows, labels = rows[order], labels[order]
    first = np.searchsorted(labels, np.arange(len(vectors)))
    keep = np.arange(len(labels)) - first[labels] < cap
    rows, labels = rows[keep], labels[keep]
    order = np.lexsort((labels, rows))
    return rows[order].astype(np.int64), labels[order].astype(np.int64)
