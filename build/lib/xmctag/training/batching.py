"""Hard-negative batching (NGAME): put similar products in the same batch, so in-batch negatives are hard.

``balanced_clusters`` splits the product embeddings into clusters of about ``cluster_size`` by recursive
balanced 2-means; ``batches_from_clusters`` shuffles the clusters and cuts their concatenation into batches.
"""

from __future__ import annotations

import numpy as np


def balanced_clusters(embeddings: np.ndarray, cluster_size: int, rng: np.random.Generator,
                      iterations: int = 5) -> list[np.ndarray]:
    """Row indices grouped into clusters of ``cluster_size // 2 + 1 .. cluster_size`` rows (unit-norm rows in)."""
    pending = [np.arange(len(embeddings))]
    clusters = []
    while pending:
        group = pending.pop()
        if len(group) <= cluster_size:
            clusters.append(group)
            continue
        left, right = _balanced_split(embeddings[group], rng, iterations)
        pending += [group[left], group[right]]
    return clusters


def _balanced_split(x: np.ndarray, rng: np.random.Generator, iterations: int) -> tuple[np.ndarray, np.ndarray]:
    """Two equal halves of ``x``'s rows: spherical 2-means where each step assigns the half nearer to centroid a."""
    a, b = x[rng.choice(len(x), size=2, replace=False)]
    half = len(x) // 2
    for _ in range(iterations):
        order = np.argsort(x @ (b - a), kind="stable")  # most a-like first
        left, right = order[:half], order[half:]
        a, b = _unit(x[left].mean(axis=0)), _unit(x[right].mean(axis=0))
    return left, right


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-12)


def batches_from_clusters(clusters: list[np.ndarray], batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    order = rng.permutation(len(clusters))
    flat = np.concatenate([clusters[i] for i in order])
    return [flat[i:i + batch_size] for i in range(0, len(flat), batch_size)]


def random_batches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    flat = rng.permutation(n)
    return [flat[i:i + batch_size] for i in range(0, n, batch_size)]
