"""``NeighbourLabels``: the label indices of each training product (CSR), and the votes of a product's neighbours.

Saved as ``train_labels.npz`` (``indptr`` int64, ``indices`` int32) in run directories and bundles; row j of the
training-product embeddings (``train_embeddings.npy``, the bundle's ``neighbours.faiss``) has the labels of row j.
Numpy only: tagging imports it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class NeighbourLabels:
    """The label indices of each training product, CSR: row j's labels are ``indices[indptr[j]:indptr[j + 1]]``."""

    indptr: np.ndarray  # (n_train + 1,) int64
    indices: np.ndarray  # (nnz,) int32

    @classmethod
    def from_lists(cls, rows: list[np.ndarray]) -> "NeighbourLabels":
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum([len(r) for r in rows], out=indptr[1:])
        indices = np.concatenate(rows).astype(np.int32) if rows else np.zeros(0, np.int32)
        return cls(indptr, indices)

    def save(self, path) -> None:
        np.savez(path, indptr=self.indptr, indices=self.indices)

    @classmethod
    def load(cls, path) -> "NeighbourLabels":
        with np.load(path, allow_pickle=False) as data:
            return cls(data["indptr"], data["indices"])

    def problem(self, n_rows: int, n_labels: int) -> str | None:
        """What makes these not the CSR labels of ``n_rows`` products over ``n_labels`` labels (``votes`` would
        index out of range or fail), or None. For files from elsewhere: a bundle is untrusted input."""
        indptr, indices = self.indptr, self.indices
        if indptr.ndim != 1 or indices.ndim != 1 or indptr.dtype.kind not in "iu" or indices.dtype.kind not in "iu":
            return "indptr and indices must be 1-d integer arrays"
        if len(indptr) != n_rows + 1:
            return f"{len(indptr) - 1} rows, not {n_rows}"
        if indptr[0] != 0 or indptr[-1] != len(indices) or (np.diff(indptr) < 0).any():
            return "indptr is not a CSR row pointer into indices"
        if len(indices) and (indices.min() < 0 or indices.max() >= n_labels):
            return f"label indices outside 0..{n_labels - 1}"
        return None

    def __len__(self) -> int:
        return len(self.indptr) - 1

    def pairs(self, neighbours: np.ndarray, values: np.ndarray):
        """Neighbour ids ``(n, k)`` (-1 = none) and a value per neighbour ``(n, k)`` -> ``(row, label, value)``
        arrays, one entry per label of each neighbour, in (row, slot) order."""
        query_rows, slots = np.nonzero(neighbours >= 0)
        train_rows = neighbours[query_rows, slots]
        counts = self.indptr[train_rows + 1] - self.indptr[train_rows]
        starts = np.repeat(self.indptr[train_rows], counts)
        offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        labels = self.indices[starts + offsets].astype(np.int64)
        return np.repeat(query_rows, counts), labels, np.repeat(values[query_rows, slots], counts)

    def votes(self, neighbours: np.ndarray, sims: np.ndarray, temperature: float):
        """Neighbour ids and similarities ``(n, k)`` (id -1 = none) -> ``(row, label, vote)`` arrays, unique pairs."""
        weights = vote_weights(neighbours, sims, temperature)
        rows, labels, pair_weights = self.pairs(neighbours, weights)
        # Sum the votes of each (row, label) pair.
        n_labels = int(labels.max()) + 1 if len(labels) else 1
        keys, inverse = np.unique(rows * n_labels + labels, return_inverse=True)
        return keys // n_labels, keys % n_labels, np.bincount(inverse, weights=pair_weights, minlength=len(keys))


def vote_weights(neighbours: np.ndarray, sims: np.ndarray, temperature: float) -> np.ndarray:
    """``(n, k)`` vote weight of each neighbour: ``exp(T * (s_j - s_max))`` normalised to sum to 1 per row (0 for
    id -1). Each neighbour gives its weight to every one of its labels."""
    valid = neighbours >= 0
    weights = np.where(valid, np.exp(temperature * (sims - np.max(np.where(valid, sims, -np.inf), axis=1,
                                                                        keepdims=True))), 0.0)
    return weights / np.maximum(weights.sum(axis=1, keepdims=True), 1e-12)
