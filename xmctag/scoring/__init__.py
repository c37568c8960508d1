"""Scoring: how a product embedding becomes ranked labels with scores in [0, 1], the one path that training's dev
evaluation and tagging share (numpy only: tagging never imports torch).

- ``label_vectors.LabelVectors``: a vector and bias per label (the model's label side);
- ``neighbours.NeighbourLabels``: the training products' labels, and the votes of a product's nearest neighbours;
- ``ranking``: candidates from a label search plus the neighbours' labels, blended and cut to the top k
  (``rank_labels``, ``blend_top_k``), with one label per exclusive facet on request.
"""

from xmctag.scoring.label_vectors import LabelVectors
from xmctag.scoring.neighbours import NeighbourLabels
from xmctag.scoring.ranking import blend_top_k, label_vector_candidates, rank_labels

__all__ = ["LabelVectors", "NeighbourLabels", "blend_top_k", "label_vector_candidates", "rank_labels"]
