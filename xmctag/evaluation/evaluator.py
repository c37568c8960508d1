"""Evaluation of embeddings during training: exact search in torch, the same scoring as tagging, then metrics."""

from __future__ import annotations

import numpy as np
import torch

from xmctag.config import Config
from xmctag.evaluation.metrics import evaluate_rankings
from xmctag.scoring import LabelVectors, NeighbourLabels, rank_labels
from xmctag.scoring.ranking import candidate_table, label_vector_candidates

SEARCH_BYTES = 256 * 2**20  # the (queries x rows) score block of one search step


@torch.inference_mode()
def exact_search(queries: np.ndarray, matrix: np.ndarray, k: int, device=None):
    """Top-``k`` rows of ``matrix`` by inner product with each query: ``(scores, indices)`` ``(n, k)``, best first
    (faiss's ``search`` convention). On ``device`` (None: the CPU), in chunks of queries whose score block stays
    within ``SEARCH_BYTES``, so memory does not grow with the number of queries."""
    array = np.asarray(matrix, dtype=np.float32)
    if not (array.flags.writeable and array.flags.c_contiguous):
        array = np.array(array)  # a copy: memory maps are read-only
    rows = torch.from_numpy(array).to(device or "cpu")
    k = min(k, len(rows))
    chunk = int(min(4096, max(64, SEARCH_BYTES // (4 * max(1, len(rows))))))
    scores, indices = [], []
    for start in range(0, len(queries), chunk):
        block = torch.from_numpy(np.ascontiguousarray(queries[start:start + chunk], dtype=np.float32))
        s, i = (block.to(rows.device) @ rows.T).topk(k, dim=1)
        scores.append(s.cpu().numpy())
        indices.append(i.cpu().numpy())
    if not scores:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    return np.concatenate(scores), np.concatenate(indices)


def exact_top_k(products: np.ndarray, vectors: LabelVectors, k: int):
    """``(n, d)`` unit-norm products -> label indices and pre-scale logits ``(n, k)`` by label vector alone."""
    queries = np.hstack([products, np.ones((len(products), 1), np.float32)])
    logits, indices = exact_search(queries, vectors.index_matrix(), k)
    return indices, logits


def neighbour_votes(products: np.ndarray, config: Config, neighbours: tuple[np.ndarray, NeighbourLabels] | None,
                    own_rows: np.ndarray | None = None, device=None):
    """``NeighbourLabels.votes`` of ``products`` over the training products (None without neighbours).
    ``own_rows``: each product's own row among the training products (a held-out slice of train), left out of its
    neighbours; ``device``: where to search (``exact_search``)."""
    if neighbours is None or config.knn_neighbours <= 0 or config.knn_weight <= 0:
        return None
    embeddings, labels = neighbours
    k = config.knn_neighbours
    sims, ids = exact_search(products, embeddings, k + (own_rows is not None), device)
    if own_rows is not None:
        others = ids != own_rows[:, None]
        others[others.sum(axis=1) > k, -1] = False  # not among them: drop the last instead
        sims, ids = sims[others].reshape(len(ids), k), ids[others].reshape(len(ids), k)
    return labels.votes(ids, sims, config.knn_temperature)


def predict_exact(products: np.ndarray, vectors: LabelVectors, k: int, config: Config,
                  neighbours: tuple[np.ndarray, NeighbourLabels] | None = None, groups: np.ndarray | None = None,
                  lexical: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None, device=None):
    """What the tagger would predict (``xmctag.scoring``), with exact search: labels and scores ``(n, k)``.

    ``neighbours``: the training products' embeddings and labels, for the kNN part (None: label vectors only);
    ``groups``: exclusive-group id per label (``label_groups.group_ids``), or None; ``lexical``: the lexical
    model's candidates, scores and label weights (``xmctag.scoring.ranking.blend_top_k``), or None; ``device``:
    where to search (``exact_search``).
    """
    matrix = vectors.index_matrix()
    votes = neighbour_votes(products, config, neighbours, device=device)
    return rank_labels(products, matrix, vectors.scale, lambda queries, n: exact_search(queries, matrix, n, device),
                       votes, config.knn_weight, k, groups, lexical=lexical)


def exact_candidates(products: np.ndarray, vectors: LabelVectors, config: Config, neighbours=None,
                     lexical: tuple[np.ndarray, np.ndarray] | None = None, own_rows: np.ndarray | None = None,
                     device=None):
    """``xmctag.scoring.ranking.candidate_table`` of ``products`` with exact search (what fusion weights are
    fitted on); ``own_rows`` and ``device`` as for ``neighbour_votes``."""
    matrix = vectors.index_matrix()
    queries = np.hstack([products, np.ones((len(products), 1), np.float32)])
    logits, top = exact_search(queries, matrix, label_vector_candidates(max(config.eval_ks)), device)
    votes = neighbour_votes(products, config, neighbours, own_rows, device)
    return candidate_table(products, matrix, vectors.scale, top, logits, votes, config.knn_weight, lexical)


def evaluate_scores(products: np.ndarray, vectors: LabelVectors, truth: list[np.ndarray], config: Config,
                    inv_p: np.ndarray | None,
                    neighbours: tuple[np.ndarray, NeighbourLabels] | None = None,
                    groups: np.ndarray | None = None, lexical=None, device=None) -> dict[str, float]:
    top, _ = predict_exact(products, vectors, max(config.eval_ks), config, neighbours, groups, lexical, device)
    return evaluate_rankings(top, truth, tuple(config.eval_ks), inv_p)
