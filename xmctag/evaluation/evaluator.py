"""Evaluation of embeddings during training: exact search in torch, the same scoring as tagging, then metrics."""

from __future__ import annotations

import numpy as np
import torch

from xmctag.config import Config
from xmctag.evaluation.metrics import evaluate_rankings
from xmctag.scoring import LabelVectors, NeighbourLabels, rank_labels


@torch.inference_mode()
def exact_search(queries: np.ndarray, matrix: np.ndarray, k: int, chunk: int = 4096):
    """Top-``k`` rows of ``matrix`` by inner product with each query: ``(scores, indices)`` ``(n, k)``, best first
    (faiss's ``search`` convention)."""
    rows = torch.from_numpy(np.array(matrix, dtype=np.float32))  # a copy: memory maps are read-only
    k = min(k, len(rows))
    scores, indices = [], []
    for start in range(0, len(queries), chunk):
        s, i = (torch.from_numpy(queries[start:start + chunk]) @ rows.T).topk(k, dim=1)
        scores.append(s.numpy())
        indices.append(i.numpy())
    return np.concatenate(scores), np.concatenate(indices)


def exact_top_k(products: np.ndarray, vectors: LabelVectors, k: int):
    """``(n, d)`` unit-norm products -> label indices and pre-scale logits ``(n, k)`` by label vector alone."""
    queries = np.hstack([products, np.ones((len(products), 1), np.float32)])
    logits, indices = exact_search(queries, vectors.index_matrix(), k)
    return indices, logits


def predict_exact(products: np.ndarray, vectors: LabelVectors, k: int, config: Config,
                  neighbours: tuple[np.ndarray, NeighbourLabels] | None = None, groups: np.ndarray | None = None):
    """What the tagger would predict (``xmctag.scoring``), with exact search: labels and scores ``(n, k)``.

    ``neighbours``: the training products' embeddings and labels, for the kNN part (None: label vectors only);
    ``groups``: exclusive-group id per label (``label_groups.group_ids``), or None.
    """
    matrix = vectors.index_matrix()
    votes = None
    if neighbours is not None and config.knn_neighbours > 0 and config.knn_weight > 0:
        embeddings, labels = neighbours
        sims, ids = exact_search(products, embeddings, config.knn_neighbours)
        votes = labels.votes(ids, sims, config.knn_temperature)
    return rank_labels(products, matrix, vectors.scale, lambda queries, n: exact_search(queries, matrix, n), votes,
                       config.knn_weight, k, groups)


def evaluate_scores(products: np.ndarray, vectors: LabelVectors, truth: list[np.ndarray], config: Config,
                    inv_p: np.ndarray | None,
                    neighbours: tuple[np.ndarray, NeighbourLabels] | None = None,
                    groups: np.ndarray | None = None) -> dict[str, float]:
    top, _ = predict_exact(products, vectors, max(config.eval_ks), config, neighbours, groups)
    return evaluate_rankings(top, truth, tuple(config.eval_ks), inv_p)
