"""Per-batch label targets without a products x labels matrix, and the shortlists of large label sets.

Both stages that train one vector per label (``label_vectors.py``, ``classifier.py``) minimise a one-vs-all binary
cross-entropy: every label is a positive or a negative of every product. Two ways to compute it per batch of B
products over the S labels the stage trains:

- **all labels** (``batch_targets``): logits ``(B, S)`` and the batch's targets built from the labels' CSR lists
  (``LabelLists``), never an ``(N, S)`` matrix. Exact; what runs up to ``Config.label_shortlist_above`` labels.
- **a shortlist** (``Shortlist``, above that size; PRIME, NGAME and DEXA train this way): each product's positives,
  its ``label_shortlist`` hardest negatives (the labels whose vectors score it highest, found once per stage with a
  faiss inverted-file search over the label vectors: approximate, which is all hard negatives need), and
  ``label_random_negatives`` labels drawn uniformly for the whole batch. Each random negative stands for
  ``S / R`` labels (its loss is weighted so; one that is a positive or hard negative of the row counts 0 there),
  so the sum is an unbiased estimate of the full one-vs-all loss and the scores stay calibrated against all labels,
  not only the hard ones.
  Cost per step: ``B * (shortlist + positives + R)`` logits instead of ``B * S``.

``LabelLists`` holds the labels of the N training products as CSR (``indptr`` ``(N + 1,)``, ``columns`` ``(nnz,)``:
column indices of the stage's labels), as torch tensors on the training device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

NPROBE = 8  # inverted lists searched per product for its hard negatives (of 2 * sqrt(labels))
CHUNK = 8192  # products searched at once


@dataclass
class LabelLists:
    """The stage's label columns of each training product, CSR (torch, on the training device)."""

    indptr: torch.Tensor  # (N + 1,) int64
    columns: torch.Tensor  # (nnz,) int64

    @classmethod
    def build(cls, product_labels: list[np.ndarray], column_of: np.ndarray, device) -> LabelLists:
        """``product_labels[i]``: label indices of product i; ``column_of[label]``: its column (>= 0)."""
        indptr = np.zeros(len(product_labels) + 1, dtype=np.int64)
        np.cumsum([len(y) for y in product_labels], out=indptr[1:])
        columns = column_of[np.concatenate(product_labels)] if len(product_labels) else np.zeros(0, np.int64)
        return cls(torch.from_numpy(indptr).to(device), torch.from_numpy(columns.astype(np.int64)).to(device))

    def of(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(row position in rows, column)`` of every label of the products ``rows``."""
        starts, ends = self.indptr[rows], self.indptr[rows + 1]
        counts = ends - starts
        position = torch.repeat_interleave(torch.arange(len(rows), device=rows.device), counts)
        offsets = torch.arange(int(counts.sum()), device=rows.device) - torch.repeat_interleave(
            torch.cumsum(counts, 0) - counts, counts)
        return position, self.columns[torch.repeat_interleave(starts, counts) + offsets]

    def padded(self, rows: torch.Tensor) -> torch.Tensor:
        """``(len(rows), max labels)`` columns of each product's labels, -1 padded."""
        position, columns = self.of(rows)
        counts = torch.bincount(position, minlength=len(rows))
        width = max(1, int(counts.max())) if len(rows) else 1
        slot = torch.arange(len(position), device=rows.device) - torch.repeat_interleave(
            torch.cumsum(counts, 0) - counts, counts)
        out = torch.full((len(rows), width), -1, dtype=torch.int64, device=rows.device)
        out[position, slot] = columns
        return out


def batch_targets(labels: LabelLists, rows: torch.Tensor, n_columns: int) -> torch.Tensor:
    """``(len(rows), n_columns)`` float targets of the products ``rows``: 1 at their labels."""
    targets = torch.zeros(len(rows), n_columns, device=rows.device)
    position, columns = labels.of(rows)
    targets[position, columns] = 1.0
    return targets


@dataclass
class Candidates:
    """One batch's labels to score: per product its positives and hard negatives (``columns`` ``(B, C)``, -1 =
    none, with ``targets`` and a 0/1 ``weight`` that counts each label once), and random negatives shared by the
    batch (``random`` ``(R,)``, with ``random_weight`` ``(B, R)``: 0 where the label is a positive or hard negative
    of the row, else what it stands for)."""

    columns: torch.Tensor
    targets: torch.Tensor
    weight: torch.Tensor
    random: torch.Tensor
    random_weight: torch.Tensor


class Shortlist:
    """Hard negatives per training product, from the label vectors that the stage starts from."""

    def __init__(self, hard: torch.Tensor, labels: LabelLists, n_columns: int, n_random: int, seed: int):
        self.hard, self.labels, self.n_columns, self.n_random = hard, labels, n_columns, n_random
        self.generator = torch.Generator().manual_seed(seed)

    @classmethod
    def build(cls, products: np.ndarray, label_matrix: np.ndarray, labels: LabelLists, size: int, n_random: int,
              seed: int, device) -> Shortlist:
        """``products`` ``(N, d)``, ``label_matrix`` ``(S, d')`` (with d' = d + 1, rows [w, b], queries get a 1
        column); each product's ``size`` best labels by inner product, by an inverted-file search."""
        from xmctag.backend import runtime

        faiss = runtime.faiss()
        matrix = np.ascontiguousarray(label_matrix, dtype=np.float32)
        d = matrix.shape[1]
        n_lists = int(min(max(1, 2 * np.sqrt(len(matrix))), max(1, len(matrix) // 39)))
        quantiser = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantiser, d, n_lists, faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(seed).permutation(len(matrix))[:64 * n_lists]
        index.train(matrix[sample])
        index.add(matrix)
        index.nprobe = min(NPROBE, n_lists)
        size = min(size, len(matrix))
        hard = np.empty((len(products), size), dtype=np.int64)
        for start in range(0, len(products), CHUNK):
            queries = np.ascontiguousarray(products[start:start + CHUNK], dtype=np.float32)
            if queries.shape[1] != d:
                queries = np.hstack([queries, np.ones((len(queries), d - queries.shape[1]), np.float32)])
            hard[start:start + CHUNK] = index.search(queries, size)[1]
        return cls(torch.from_numpy(hard).to(device), labels, len(matrix), n_random, seed)

    def candidates(self, rows: torch.Tensor) -> Candidates:
        """The labels that the products ``rows`` are scored against in one step (see the module docstring)."""
        positives = self.labels.padded(rows)  # (B, P), -1 padded
        hard = self.hard[rows]  # (B, M), -1 where the search found fewer
        # A hard negative that is a positive is already counted among the positives.
        is_positive = _member(hard, positives, self.n_columns)
        columns = torch.cat([positives, hard], dim=1)
        targets = torch.cat([torch.ones_like(positives), torch.zeros_like(hard)], dim=1).float()
        weight = torch.cat([positives >= 0, (hard >= 0) & ~is_positive], dim=1).float()
        random = torch.randint(0, self.n_columns, (self.n_random,), generator=self.generator).to(rows.device)
        # Drawn uniformly from all S labels, each random label stands for S / R of them; those that are the row's
        # positives or hard negatives (counted above) get 0, so the sum is an unbiased estimate of the loss over the
        # labels the candidates do not hold.
        known = _member(random.expand(len(rows), -1), torch.where(weight > 0, columns, -1), self.n_columns)
        random_weight = torch.where(known, 0.0, self.n_columns / max(1, self.n_random))
        return Candidates(columns, targets, weight, random, random_weight)


def _member(values: torch.Tensor, sets: torch.Tensor, n_columns: int) -> torch.Tensor:
    """``(B, V)`` whether ``values[b, j]`` is in row b of ``sets`` ``(B, W)`` (-1 = no element): a sorted search per
    row, not a ``(B, V, W)`` comparison."""
    ordered = torch.where(sets >= 0, sets, n_columns).sort(dim=1).values
    at = torch.searchsorted(ordered, values.contiguous()).clamp(max=ordered.shape[1] - 1)
    return (ordered.gather(1, at) == values) & (values >= 0)


def sampled_bce(logits: torch.Tensor, random_logits: torch.Tensor, candidates: Candidates) -> torch.Tensor:
    """Mean over the batch of the estimated one-vs-all BCE: the candidates' losses plus the weighted random
    negatives'. ``logits`` ``(B, C)`` of ``candidates.columns`` (any value where -1), ``random_logits`` ``(B, R)``."""
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    loss = (bce(logits, candidates.targets, reduction="none") * candidates.weight).sum()
    loss = loss + (bce(random_logits, torch.zeros_like(random_logits), reduction="none")
                   * candidates.random_weight).sum()
    return loss / len(logits)


class RowAdam:
    """Adam over the rows of ``table`` that a step uses (lazy Adam, as torch's ``SparseAdam``, without sparse
    tensors): ``rows(ids)`` (unique ids) gives those rows as a leaf tensor to compute the loss with, ``step()``
    updates them from its gradient; the moments of the other rows wait. Bias correction by the global step."""

    def __init__(self, table: torch.Tensor, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.table, self.lr, self.betas, self.eps = table, lr, betas, eps
        self.m, self.v = torch.zeros_like(table), torch.zeros_like(table)
        self.steps = 0
        self.ids = self.leaf = None

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        self.ids, self.leaf = ids, self.table[ids].requires_grad_()
        return self.leaf

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to reset: each step's rows are a new leaf."""

    @torch.no_grad()
    def step(self) -> None:
        b1, b2 = self.betas
        self.steps += 1
        g, ids = self.leaf.grad, self.ids
        m = self.m[ids].mul_(b1).add_(g, alpha=1 - b1)
        v = self.v[ids].mul_(b2).addcmul_(g, g, value=1 - b2)
        self.m[ids], self.v[ids] = m, v
        update = (m / (1 - b1 ** self.steps)) / ((v / (1 - b2 ** self.steps)).sqrt_() + self.eps)
        self.table[ids] -= self.lr * update

