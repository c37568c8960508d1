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

from xmctag import run_dir
from xmctag.config import Config
from xmctag.evaluation.evaluator import exact_candidates
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
                             cluster_k=config.lexical_cluster_k, max_depth=config.lexical_max_depth,
                             balanced=config.lexical_cluster_balanced)
    settings = {"trees": config.lexical_trees, "cluster_k": config.lexical_cluster_k,
                "cluster_balanced": config.lexical_cluster_balanced, "max_depth": config.lexical_max_depth,
                "min_df": config.lexical_min_df,
                "max_features": config.lexical_max_features, "beam": config.lexical_beam,
                "candidates": config.lexical_candidates}
    LexicalModel(features, trees, settings).save(folder)
    return LexicalModel.load(folder)


def train_lexical_stage(data, config: Config, out: Path, show) -> tuple[LexicalModel, float]:
    """The lexical stage of ``xmctag.train``: features and trees on ``data.train`` (``TrainingData``) but its
    held-out slice (``holdout_rows``, no dev set only), written to ``out/lexical``; with the minutes it took."""
    started = time.perf_counter()
    keep = np.setdiff1d(np.arange(len(data.train)), _held_out(data, config))
    with show.task("lexical model: TF-IDF + label trees", total=None):
        model = train_lexical([data.train.texts[i] for i in keep], [data.train.labels[i] for i in keep],
                              len(data.labels), config, out / run_dir.LEXICAL)
    seconds = time.perf_counter() - started
    show.log(f"lexical model: {model.features.n_features:,} features, label trees in {seconds:.0f} s (out of the "
             "time budget)")
    return model, seconds / 60


def fit_lexical_fusion(model: LexicalModel, data, config: Config, out: Path, vectors, products, dev_products,
                       dev_lexical, neighbours, show) -> None:
    """The fusion weights of ``model`` with the final dense model (``vectors``, the training ``products``'
    embeddings and ``neighbours``), fitted on dev (``dev_products``, and ``dev_lexical``: ``model.predict`` of the
    dev texts, which the dev metrics use too) or the held-out slice, saved with it."""
    held = _held_out(data, config)
    lexical = None
    if data.dev is not None:
        lexical, truth, queries, own, fitted_on = dev_lexical, data.dev.labels, dev_products, None, "dev"
    elif len(held):
        lexical = model.predict([data.train.texts[i] for i in held])
        truth = [data.train.labels[i] for i in held]
        queries, own, fitted_on = products[held], held, f"a held-out slice of train ({len(held)} rows)"
    else:
        model.fusion = {"bands": list(config.lexical_bands), "weights": [0.5] * (len(config.lexical_bands) + 1),
                        "fitted_on": "nothing (no dev set, too few training rows to hold out): 0.5"}
    if lexical is not None:
        table = exact_candidates(queries, vectors, config, neighbours, lexical, own)
        model.fusion = fit_fusion(table, truth, data.inv_p, data.train_label_counts(), config, fitted_on)
    model.save_spec(out / run_dir.LEXICAL)
    show.log(f"fusion weights {model.fusion['weights']} for training counts <= {config.lexical_bands} and above "
             f"(fitted on {model.fusion['fitted_on']})")


def _held_out(data, config: Config) -> np.ndarray:
    if data.dev is not None:
        return np.array([], dtype=np.int64)
    return holdout_rows(len(data.train), config.seed)


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
