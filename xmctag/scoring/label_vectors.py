"""``LabelVectors``: one vector and bias per label, the model's label side at tagging time.

``score(q, l) = sigmoid(scale * (<q, vectors[l]> + bias[l]))`` for a unit-norm product embedding q. Fitted by the
second training stage (``xmctag.training.label_vectors``) or taken from the classifier stage's head; stored in run
directories and bundles as ``label_vectors.npy``, ``(L, d + 1)`` float32 rows ``[w_l, b_l]`` (``index_matrix``), so
that a query ``[q, 1]`` gets the pre-scale logit by one inner product. Numpy only: tagging imports it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class LabelVectors:
    """``vectors`` ``(L, d)`` and ``bias`` ``(L,)``: score(q, l) = sigmoid(scale * (<q, vectors[l]> + bias[l]))."""

    vectors: np.ndarray
    bias: np.ndarray
    scale: float

    def index_matrix(self) -> np.ndarray:
        """``(L, d + 1)`` rows [w_l, b_l]; a query [q, 1] gets the pre-scale logit by inner product."""
        return np.hstack([self.vectors, self.bias[:, None]]).astype(np.float32)

    @classmethod
    def from_text_embeddings(cls, label_embeddings: np.ndarray, scale: float) -> "LabelVectors":
        """Plain dual-encoder scoring (no second stage): logit = scale * <q, e_l>."""
        return cls(label_embeddings.astype(np.float32), np.zeros(len(label_embeddings), np.float32), scale)
