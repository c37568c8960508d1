"""Evaluation of embeddings during training: exact top-k over label vectors, then the ranking metrics."""

from __future__ import annotations

import numpy as np
import torch

from xmctag.config import Config
from xmctag.evaluation.metrics import evaluate_rankings
from xmctag.training.label_vectors import LabelVectors


@torch.inference_mode()
def exact_top_k(products: np.ndarray, vectors: LabelVectors, k: int, chunk: int = 4096):
    """``(n, d)`` unit-norm products -> label indices and pre-scale logits ``(n, k)``, best first."""
    index = torch.from_numpy(vectors.index_matrix())
    k = min(k, len(index))
    indices, scores = [], []
    for start in range(0, len(products), chunk):
        q = torch.from_numpy(products[start:start + chunk])
        q = torch.cat([q, torch.ones(len(q), 1)], dim=1)
        s, i = (q @ index.T).topk(k, dim=1)
        indices.append(i.numpy())
        scores.append(s.numpy())
    return np.concatenate(indices), np.concatenate(scores)


def evaluate_scores(products: np.ndarray, vectors: LabelVectors, truth: list[np.ndarray], config: Config,
                    inv_p: np.ndarray | None) -> dict[str, float]:
    top, _ = exact_top_k(products, vectors, max(config.eval_ks))
    return evaluate_rankings(top, truth, tuple(config.eval_ks), inv_p)
