"""Evidence for a product's labels (``tag --evidence N``): the training products whose neighbour votes gave most.

A product's ``k`` nearest training products (the neighbour search that ``xmctag.scoring.ranking`` blends in) vote
for each of their labels with the weight ``w_j = exp(T * (s_j - s_max)) / sum`` (``neighbours.vote_weights``;
``s_j`` the similarity of neighbour j, the inner product of unit-norm embeddings, i.e. the cosine). Neighbour j's
**contribution** to the labels the product was given, ``R`` (its top-k as written: after ``--min-score`` and
exclusive groups), is

    c_j = w_j * |labels(j) ∩ R|

the neighbour vote it added to those labels' scores (before ``knn_weight``). The evidence is the ``N`` neighbours
with the largest ``c_j > 0``, by ``c_j``, then by similarity (higher first), then by training row (lower first);
each with its similarity ``s_j``. A neighbour that carries none of the returned labels is never evidence, so a
product whose labels got no neighbour vote has none, and at most ``min(N, k)`` are returned. Numpy only.
"""

from __future__ import annotations

import numpy as np

from xmctag.scoring.neighbours import NeighbourLabels, vote_weights


def top_evidence(labels: NeighbourLabels, neighbours: np.ndarray, sims: np.ndarray, temperature: float,
                 returned: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Training rows ``(q, min(n, k))`` (-1 = none) and their similarities ``(q, min(n, k))`` float32 of the
    evidence of each product (module docstring). ``neighbours``/``sims``: the neighbour search ``(q, k)`` (id -1 =
    none); ``returned``: the label indices each product was given ``(q, top_k)`` (-1 = none)."""
    q, k = neighbours.shape
    n = min(n, k)
    weights = vote_weights(neighbours, sims, temperature)
    rows, label_of, slots = labels.pairs(neighbours, np.broadcast_to(np.arange(k), (q, k)))
    valid = returned >= 0
    n_labels = int(max(label_of.max(initial=-1), returned.max(initial=-1))) + 1
    given = np.nonzero(valid)[0] * n_labels + returned[valid]
    hit = np.isin(rows * n_labels + label_of, given)
    carried = np.bincount(rows[hit] * k + slots[hit], minlength=q * k).reshape(q, k)
    contribution = weights * carried
    order = np.lexsort((neighbours, -sims, -contribution), axis=-1)[:, :n]
    top = np.take_along_axis(neighbours, order, axis=1)
    top_sims = np.take_along_axis(sims, order, axis=1).astype(np.float32)
    none = np.take_along_axis(contribution, order, axis=1) <= 0
    top[none] = -1
    top_sims[none] = 0.0
    return top, top_sims
