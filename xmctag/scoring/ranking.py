"""How a product's label scores are made: label vectors blended with the labels of its nearest training products,
and, for bundles with a lexical model, fused with its scores.

Two signals, both over the same unit-norm product embedding q:

- **label vectors** (``training/label_vectors.py``): ``p_lv(l) = sigmoid(scale * (<q, w_l> + b_l))``, one
  classifier per label, strong on frequent labels and still defined for labels never seen in training;
- **neighbour votes** (kNN over the training products, as in NGAME/PRIME's "kNN + classifier" ensembles): the
  ``k`` training products most similar to q vote for their labels with weights ``exp(T * (s_j - s_max))``,
  normalised to sum to 1, so ``p_nn(l)`` is in [0, 1]. It recovers label combinations that a single vector per
  label misses (long-tail labels, co-occurring facets).

The dense score is ``(1 - knn_weight) * p_lv + knn_weight * p_nn``, in [0, 1]. With a lexical model
(``xmctag.lexical``: TF-IDF label trees) the score xmctag reports is ``(1 - a_l) * dense + a_l * p_lex``, where
``p_lex`` in [0, 1] is the lexical model's score (0 for a label outside its top candidates) and ``a_l`` the weight
fitted on dev for label l's training-frequency band; otherwise it is the dense score. With ``groups`` (``tag
--exclusive-groups``), labels of an exclusive group (a facet no training product has two values of,
``label_groups.py``) compete for one place: only the best of each such group stays in the ranking. Only candidates are
scored: the top labels by label vector plus every label of a neighbour (and the lexical model's top labels), so the
cost does not grow with the
number of labels (``rank_labels`` widens the candidates only for products whose best labels crowd into exclusive
groups). This module is numpy only: dev evaluation (exact search in torch) and tagging (faiss) share it.
"""

from __future__ import annotations

import numpy as np

CHUNK = 16384  # label-vector rows gathered at once when scoring neighbour candidates (bounded memory)
DENSE_PAIRS_FACTOR = 16  # score a chunk as (its rows x its labels) when that is at most this many times its pairs


def rank_labels(queries: np.ndarray, label_vectors: np.ndarray, scale: float, search,
                votes: tuple[np.ndarray, np.ndarray, np.ndarray] | None, knn_weight: float, k: int,
                groups: np.ndarray | None = None, pool: int | None = None,
                lexical: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` labels ``(n, k)`` (-1 where fewer labels) and scores of unit-norm ``queries``, as ``blend_top_k``,
    with the label-vector candidates from ``search(queries_with_a_1_column, n) -> (logits, indices)`` (faiss's
    ``index.search``, or an exact search).

    The top ``pool`` >= k labels by label vector (default ``label_vector_candidates(k)``) and the neighbours' labels
    hold the exact dense top-k: any other label has no vote and a lower logit, so it scores below each of those
    ``pool``. With ``lexical`` (``blend_top_k``) the fused top-k is taken among those and the lexical candidates: a
    label outside all three lists has no lexical score, and could only outrank a pool label through a larger dense
    weight of its band, on a dense score below that label's.
    With ``groups`` that holds only while the ``pool`` labels leave at least ``k`` places (one per exclusive group);
    rows where they do not (a product whose best 32 labels are all colours) are searched again with twice as many
    candidates, until ``k`` places or every label: the extra cost is only for those rows.
    """
    n_labels = len(label_vectors)
    pool = min(pool or label_vector_candidates(k), n_labels)
    logits, top = search(np.hstack([queries, np.ones((len(queries), 1), queries.dtype)]), pool)
    indices, scores = blend_top_k(queries, label_vectors, scale, top, logits, votes, knn_weight, k, groups, lexical)
    if groups is not None and pool < n_labels:
        short = np.flatnonzero(_places(top, groups) < k)
        if len(short):
            lexical_short = (lexical[0][short], lexical[1][short], lexical[2]) if lexical is not None else None
            indices[short], scores[short] = rank_labels(queries[short], label_vectors, scale, search,
                                                        _votes_of_rows(votes, short), knn_weight, k, groups, 2 * pool,
                                                        lexical_short)
    return indices, scores


def _places(top: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Per row, how many of the labels ``top`` (-1 = none) survive one-per-exclusive-group: the ungrouped ones plus
    one per group."""
    group = np.where(top >= 0, groups[np.maximum(top, 0)], -2)  # -2: no label, -1: ungrouped
    group.sort(axis=1)
    first = np.ones(group.shape, dtype=bool)
    first[:, 1:] = group[:, 1:] != group[:, :-1]
    return ((group == -1) | ((group >= 0) & first)).sum(axis=1)


def _votes_of_rows(votes, rows: np.ndarray):
    """``NeighbourLabels.votes`` output restricted to ``rows`` (sorted), renumbered 0..len(rows) - 1."""
    if votes is None:
        return None
    v_rows, v_labels, v_votes = votes
    keep = np.isin(v_rows, rows)
    return np.searchsorted(rows, v_rows[keep]), v_labels[keep], v_votes[keep]


def blend_top_k(queries: np.ndarray, label_vectors: np.ndarray, scale: float, lv_top: np.ndarray,
                lv_logits: np.ndarray, votes: tuple[np.ndarray, np.ndarray, np.ndarray] | None, knn_weight: float,
                k: int, groups: np.ndarray | None = None,
                lexical: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Final top-``k`` labels ``(n, k)`` (-1 where fewer candidates) and scores ``(n, k)`` float32, best first.

    ``queries`` ``(n, d)`` unit-norm product embeddings; ``label_vectors`` ``(L, d + 1)`` rows [w_l, b_l] (may be
    a memory map); ``lv_top``/``lv_logits`` ``(n, C)``: the label-vector search's candidates and their pre-scale
    logits (-1 = none); ``votes``: ``NeighbourLabels.votes`` output, or None for label vectors only;
    ``groups``: ``(L,)`` exclusive-group id per label (-1: none), or None: at most one label per group and row;
    ``lexical``: the lexical model's candidates ``(n, C')`` (-1 = none), their scores, and each label's lexical
    weight ``(L,)`` (``fused_scores``), or None: the dense score alone.
    """
    table = candidate_table(queries, label_vectors, scale, lv_top, lv_logits, votes, knn_weight, lexical)
    weights = lexical[2] if lexical is not None else None
    return top_k_per_row(table, fused_scores(table, weights), len(queries), k, groups)


def candidate_table(queries: np.ndarray, label_vectors: np.ndarray, scale: float, lv_top: np.ndarray,
                    lv_logits: np.ndarray, votes, knn_weight: float, lexical=None) -> dict[str, np.ndarray]:
    """Every (row, label) candidate once, with its three signals: ``rows``, ``labels``, ``dense`` (``(1 - w) *
    p_lv + w * p_nn``), ``lexical`` (the lexical model's score, 0 where it did not return the label). A candidate
    from the neighbours or the lexical model gets its exact label-vector logit (``pair_logits``)."""
    n_labels = len(label_vectors)
    valid = lv_top >= 0
    rows = [np.repeat(np.arange(len(queries)), valid.sum(axis=1))]
    labels = [lv_top[valid].astype(np.int64)]
    logits = [lv_logits[valid].astype(np.float64)]
    vote = [np.zeros(len(labels[0]))]
    lex = [np.zeros(len(labels[0]))]
    use_votes = votes is not None and knn_weight > 0 and len(votes[0])
    if use_votes:
        v_rows, v_labels, v_votes = votes
        rows.append(v_rows)
        labels.append(v_labels)
        logits.append(pair_logits(queries, label_vectors, v_rows, v_labels))
        vote.append(v_votes)
        lex.append(np.zeros(len(v_rows)))
    if lexical is not None:
        l_top, l_scores = lexical[0], lexical[1]
        found = l_top >= 0
        l_rows, l_labels = np.repeat(np.arange(len(queries)), found.sum(axis=1)), l_top[found].astype(np.int64)
        rows.append(l_rows)
        labels.append(l_labels)
        logits.append(pair_logits(queries, label_vectors, l_rows, l_labels))
        vote.append(np.zeros(len(l_rows)))
        lex.append(l_scores[found].astype(np.float64))
    rows, labels, logits = np.concatenate(rows), np.concatenate(labels), np.concatenate(logits)
    vote, lex = np.concatenate(vote), np.concatenate(lex)
    if len(vote) > valid.sum():
        # A label found by more than one search appears more than once: one candidate, its vote and lexical score
        # summed (each is 0 in the other searches' copies).
        keys, inverse = np.unique(rows * n_labels + labels, return_inverse=True)
        unique_logits = np.empty(len(keys))
        unique_logits[inverse] = logits
        rows, labels, logits = keys // n_labels, keys % n_labels, unique_logits
        vote = np.bincount(inverse, weights=vote, minlength=len(keys))
        lex = np.bincount(inverse, weights=lex, minlength=len(keys))
    lv_prob = 1.0 / (1.0 + np.exp(-scale * logits))
    weight = knn_weight if votes is not None else 0.0  # without neighbours the label vectors score alone
    return {"rows": rows, "labels": labels, "dense": (1.0 - weight) * lv_prob + weight * vote, "lexical": lex}


def fused_scores(table: dict[str, np.ndarray], lexical_weights: np.ndarray | None) -> np.ndarray:
    """``(1 - a_l) * dense + a_l * lexical`` per candidate, ``a_l`` the lexical weight of its label (None: dense)."""
    if lexical_weights is None:
        return table["dense"]
    a = lexical_weights[table["labels"]]
    return (1.0 - a) * table["dense"] + a * table["lexical"]


def top_k_per_row(table: dict[str, np.ndarray], scores: np.ndarray, n: int, k: int,
                  groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best candidates of each of ``n`` rows by ``scores`` (one per exclusive group with ``groups``)."""
    rows, labels = table["rows"], table["labels"]
    if groups is not None:
        rows, labels, scores = _best_of_each_group(rows, labels, scores, groups)
    # Per-row top-k over a variable number of candidates: sort by (row, -score), keep the first k of each row.
    order = np.lexsort((-scores, rows))
    rows, labels, scores = rows[order], labels[order], scores[order]
    row_start = np.searchsorted(rows, np.arange(n))
    rank = np.arange(len(rows)) - row_start[rows]
    keep = rank < k
    top = np.full((n, k), -1, dtype=np.int64)
    top_scores = np.zeros((n, k), dtype=np.float32)
    top[rows[keep], rank[keep]] = labels[keep]
    top_scores[rows[keep], rank[keep]] = scores[keep]
    return top, top_scores


def _best_of_each_group(rows: np.ndarray, labels: np.ndarray, scores: np.ndarray, groups: np.ndarray):
    """The candidates without those beaten by a better label of the same exclusive group in the same row."""
    group = groups[labels]
    order = np.lexsort((-scores, group, rows))  # by row, then group, best first
    r, g = rows[order], group[order]
    first_of_run = np.ones(len(order), dtype=bool)
    first_of_run[1:] = (r[1:] != r[:-1]) | (g[1:] != g[:-1])
    keep = order[first_of_run | (g < 0)]  # ungrouped labels (-1) are never dropped
    return rows[keep], labels[keep], scores[keep]


def pair_logits(queries: np.ndarray, label_vectors: np.ndarray, rows: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Pre-scale label-vector logits ``<[q_row, 1], [w_l, b_l]>`` for given (row, label) pairs, in chunks."""
    out = np.empty(len(rows), dtype=np.float64)
    d = queries.shape[1]
    for start in range(0, len(rows), CHUNK):
        r, lab = rows[start:start + CHUNK], labels[start:start + CHUNK]
        needed = np.unique(lab)  # sorted: a memory-mapped table is read in order, each row once
        w = np.asarray(label_vectors[needed], dtype=np.float32)
        pos = np.searchsorted(needed, lab)
        row_ids, row_pos = np.unique(r, return_inverse=True)
        if len(row_ids) * len(needed) <= DENSE_PAIRS_FACTOR * len(r):
            # Few distinct labels (facets, small label sets): one matrix product beats gathering a vector per pair.
            logits = queries[row_ids] @ w[:, :d].T + w[:, d]
            out[start:start + CHUNK] = logits[row_pos, pos]
        else:
            out[start:start + CHUNK] = np.einsum("nd,nd->n", queries[r], w[pos, :d]) + w[pos, d]
    return out


def label_vector_candidates(k: int) -> int:
    """How many labels the label-vector search returns before blending (the final top-k is taken among these and
    the neighbours' labels)."""
    return max(2 * k, 32)
