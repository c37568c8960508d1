"""Ranking metrics for extreme multi-label classification.

All functions take

- ``predicted``: an ``(n_rows, K)`` int array of label indices, best first, ``-1`` where a row has fewer than
  ``K`` predictions (e.g. after ``--min-score``);
- ``truth``: a list of ``n_rows`` int arrays, the relevant label indices of each row (order irrelevant);

and return plain floats in [0, 1]. Definitions follow the Extreme Classification Repository (pyxclib):

- P@k      = mean over rows of |top-k ∩ truth| / k
- nDCG@k   = mean over rows of DCG@k / ideal DCG@k, with ideal DCG over min(k, |truth|) relevant items
- PSP@k    = sum over rows of Σ_{r≤k} rel_r / p_{l_r}, divided by the same sum for the ideal ranking (the truth
             sorted by 1/p); p_l are the Jain et al. (2016) propensities, see ``inverse_propensity``
- R@k      = mean over rows of |top-k ∩ truth| / |truth|

Rows with an empty truth count as zero in P/nDCG/R (they are in the denominator), as in pyxclib.
"""

from __future__ import annotations

import numpy as np


def inverse_propensity(label_counts: np.ndarray, n_rows: int, a: float = 0.55, b: float = 1.5) -> np.ndarray:
    """1/p_l for each label, from its count among ``n_rows`` training rows.

    p_l = 1 / (1 + C * exp(-A * log(N_l + B))), C = (log N - 1) * (B + 1)^A  (Jain, Prabhu, Varma 2016).
    """
    c = (np.log(max(n_rows, 2)) - 1.0) * (b + 1.0) ** a
    return 1.0 + c * np.exp(-a * np.log(np.asarray(label_counts, dtype=np.float64) + b))


def hit_matrix(predicted: np.ndarray, truth: list[np.ndarray]) -> np.ndarray:
    """Boolean ``(n_rows, K)``: is ``predicted[i, r]`` one of row i's true labels."""
    predicted = np.asarray(predicted, dtype=np.int64)
    n, k = predicted.shape
    if len(truth) != n:
        raise ValueError(f"{n} prediction rows but {len(truth)} truth rows")
    width = int(max(predicted.max(initial=0), max((t.max(initial=0) for t in truth), default=0))) + 1
    row_of_truth = np.repeat(np.arange(n, dtype=np.int64), [len(t) for t in truth])
    truth_keys = row_of_truth * width + (np.concatenate(truth).astype(np.int64) if n else np.zeros(0, np.int64))
    pred_keys = np.arange(n, dtype=np.int64)[:, None] * width + predicted
    return np.isin(pred_keys, truth_keys) & (predicted >= 0)


def precision_at(hits: np.ndarray, k: int) -> float:
    return float(hits[:, :k].sum(axis=1).mean() / k) if len(hits) else 0.0


def recall_at(hits: np.ndarray, truth: list[np.ndarray], k: int) -> float:
    sizes = np.array([len(t) for t in truth], dtype=np.float64)
    found = hits[:, :k].sum(axis=1)
    return float(np.where(sizes > 0, found / np.maximum(sizes, 1), 0.0).mean()) if len(hits) else 0.0


def ndcg_at(hits: np.ndarray, truth: list[np.ndarray], k: int) -> float:
    if not len(hits):
        return 0.0
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = (hits[:, :k] * discount[: hits[:, :k].shape[1]]).sum(axis=1)
    ideal_cum = np.concatenate([[0.0], np.cumsum(discount)])
    ideal = ideal_cum[np.minimum([len(t) for t in truth], k)]
    return float(np.where(ideal > 0, dcg / np.where(ideal > 0, ideal, 1.0), 0.0).mean())


def psp_at(predicted: np.ndarray, hits: np.ndarray, truth: list[np.ndarray], inv_p: np.ndarray, k: int) -> float:
    if not len(hits):
        return 0.0
    gains = np.where(hits[:, :k], inv_p[np.maximum(predicted[:, :k], 0)], 0.0).sum()
    ideal = sum(np.sort(inv_p[t])[::-1][:k].sum() for t in truth if len(t))
    return float(gains / ideal) if ideal > 0 else 0.0


def evaluate_rankings(
    predicted: np.ndarray,
    truth: list[np.ndarray],
    ks: tuple[int, ...] = (1, 3, 5),
    inv_p: np.ndarray | None = None,
) -> dict[str, float]:
    """All metrics as ``{"P@1": ..., "nDCG@5": ..., "PSP@3": ..., "R@5": ...}`` (values in [0, 1]).

    PSP is included only when ``inv_p`` (one entry per label index) is given.
    """
    predicted = np.asarray(predicted, dtype=np.int64)
    if predicted.ndim != 2:
        raise ValueError("predicted must be a 2-d array of label indices")
    hits = hit_matrix(predicted, truth)
    out: dict[str, float] = {}
    for k in ks:
        out[f"P@{k}"] = precision_at(hits, k)
    for k in ks:
        out[f"nDCG@{k}"] = ndcg_at(hits, truth, k)
    if inv_p is not None:
        for k in ks:
            out[f"PSP@{k}"] = psp_at(predicted, hits, truth, inv_p, k)
    for k in ks:
        out[f"R@{k}"] = recall_at(hits, truth, k)
    return out
