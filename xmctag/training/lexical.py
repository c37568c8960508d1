"""The lexical stage: TF-IDF features and label trees trained on the training texts (``xmctag.lexical``), then the
weights that fuse their scores with the dense ones (``xmctag.scoring.ranking``), fitted per label-frequency band.

The weights are fitted on dev; without ``--dev``, on a held-out slice of train (``HOLDOUT_SHARE``, at most
``HOLDOUT_MAX`` rows) that the label trees do not train on, with each held-out product left out of its own
neighbours. The dense model did train on that slice, so its scores there are optimistic: the weights lean towards
the dense side (give a dev set for the best fusion). The fit maximises P@1 + P@5 + PSP@5: one weight for every band
on a grid, then each band's own weight in turn (coordinate ascent, two rounds).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from xmctag.config import Config
from xmctag.evaluation.metrics import evaluate_rankings
from xmctag.lexical import LexicalModel, label_weights
from xmctag.lexical.features import TfidfFeatures
from xmctag.lexical.trees import LabelTrees
from xmctag.scoring.ranking import fused_scores, top_k_per_row

HOLDOUT_SHARE = 0.1
HOLDOUT_MAX = 5000
GRID = np.round(np.linspace(0.0, 1.0, 21), 2)


def train_lexical(texts: list[str], labels: list[np.ndarray], n_labels: int, config: Config,
                  folder: Path) -> LexicalModel:
    """The features and label trees (no fusion weights yet: ``fit_fusion``, then ``save_spec``), saved to
    ``folder`` and loaded back from there: omikuji's saved trees score a little differently from the trained ones
    (1 ulp), and training must score with the very model tagging loads."""
    features = TfidfFeatures.fit(texts, min_df=config.lexical_min_df, max_features=config.lexical_max_features)
    matrix = features.transform(texts)
    trees = LabelTrees.train(matrix, labels, n_labels, trees=config.lexical_trees,
                             cluster_k=config.lexical_cluster_k, max_depth=config.lexical_max_depth)
    settings = {"trees": config.lexical_trees, "cluster_k": config.lexical_cluster_k,
                "max_depth": config.lexical_max_depth, "min_df": config.lexical_min_df,
                "max_features": config.lexical_max_features, "beam": config.lexical_beam,
                "candidates": config.lexical_candidates}
    LexicalModel(features, trees, settings).save(folder)
    return LexicalModel.load(folder)


def holdout_rows(n: int, seed: int) -> np.ndarray:
    """The training rows the label trees leave out when there is no dev set (sorted)."""
    size = min(HOLDOUT_MAX, int(n * HOLDOUT_SHARE))
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False)) if size >= 1 else np.array([], int)


def fit_fusion(table: dict, truth: list[np.ndarray], inv_p: np.ndarray, train_counts: np.ndarray, config: Config,
               fitted_on: str) -> dict:
    """The lexical weight of each training-count band (``config.lexical_bands``) that maximises P@1 + P@5 + PSP@5
    of the fused ranking of ``table`` (``xmctag.scoring.ranking.candidate_table``, with the lexical candidates)."""
    bands = list(config.lexical_bands)
    k = max(config.eval_ks)
    n = len(truth)
    started = time.perf_counter()

    def objective(weights) -> float:
        fusion = {"bands": bands, "weights": list(weights)}
        top, _ = top_k_per_row(table, fused_scores(table, label_weights(fusion, train_counts)), n, k)
        m = evaluate_rankings(top, truth, (1, 5) if k >= 5 else (1, k), inv_p)
        return sum(m[key] for key in m if key in ("P@1", f"P@{min(k, 5)}", f"PSP@{min(k, 5)}"))

    scores = {a: objective([a] * (len(bands) + 1)) for a in GRID}
    best = max(GRID, key=lambda a: (scores[a], -abs(a - 0.5)))
    weights, value = [float(best)] * (len(bands) + 1), scores[best]
    present = np.searchsorted(bands, train_counts, side="left")
    for _ in range(2):
        for band in range(len(weights)):
            if not (present == band).any():
                continue
            for a in GRID:
                trial = weights.copy()
                trial[band] = float(a)
                v = objective(trial)
                if v > value + 1e-9:
                    weights, value = trial, v
    return {"bands": bands, "weights": weights, "fitted_on": fitted_on, "rows": n,
            "objective": "P@1 + P@5 + PSP@5", "value": round(value, 6),
            "seconds": round(time.perf_counter() - started, 1)}
