"""Exclusive label groups (facets): with ``tag --exclusive-groups``, at most one label of such a group per product.

Attribute label sets are often facets (colour, usage, article type) where each product has exactly one value. A
ranking of independent label scores can put two colours in a product's top 5 and leave its usage out. When the
training data shows that a group is exclusive (no training product carries two of its labels), the tagger can keep
only the best-scoring label of that group for each product and fill the top-k from the other groups. It is opt-in:
on Myntra dev it never raised P@5 and lowered it on two-word titles (README, "Facets").

- ``group_names``: a ``LabelTable`` and the ``Config`` in -> each label's group name (None: no group). Groups come
  from the label table's ``label_group_col`` column (``column``) or from the label id's prefix before ":"
  (``prefix``: ``colour:Blue`` -> ``colour``); ``auto`` takes the column when the table has one, else the prefix
  when every label id has one, else no groups; ``none`` turns the feature off.
- ``exclusive_groups``: group names and the training products' label lists in -> each label's group name if its group
  is exclusive in training, else None. Training saves this as the run's label table ``exclusive_group`` column, so
  export and tagging need nothing else.
- ``group_ids``: those names -> ``(L,)`` int64 ids, -1 for unconstrained labels (what ``scoring.blend_top_k`` takes),
  or None when no label is in an exclusive group.

The choice is made among the scored candidates (the top labels by label vector plus the neighbours' labels); where
those hold fewer than k places (ungrouped labels plus one per group), ``scoring.rank_labels`` searches that product
again with more candidates, so a top-k comes out short only when the whole label set has fewer places than k.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from xmctag.config import Config
from xmctag.errors import UserError

SEPARATOR = ":"


def group_names(labels, config: Config) -> list[str | None]:
    """Each label's group (None: none) by ``config.label_groups``; see the module docstring."""
    mode = config.label_groups
    if mode == "none":
        return [None] * len(labels)
    if mode == "column" or (mode == "auto" and labels.groups is not None):
        if labels.groups is None:
            raise UserError(f"label_groups = column: the label table has no column {config.label_group_col}")
        return [g or None for g in labels.groups]
    prefixes = [label.split(SEPARATOR, 1)[0] if SEPARATOR in label[1:] else None for label in labels.ids]
    if mode == "auto" and any(p is None for p in prefixes):
        return [None] * len(labels)  # not a "facet:value" label set
    return prefixes


def exclusive_groups(names: list[str | None], label_lists: list[np.ndarray]) -> list[str | None]:
    """``names`` kept only for the groups that no training product has two labels of (each label's group or None)."""
    shared: set[str] = set()
    for row in label_lists:
        counts = Counter(names[i] for i in row if names[i] is not None)
        shared.update(g for g, n in counts.items() if n > 1)
    return [g if g is not None and g not in shared else None for g in names]


def group_ids(exclusive: list[str | None] | None) -> np.ndarray | None:
    """Label -> exclusive-group id ``(L,)`` int64, -1 = unconstrained; None if there are no exclusive groups."""
    if exclusive is None or all(g is None for g in exclusive):
        return None
    ids: dict[str, int] = {}
    return np.array([-1 if g is None else ids.setdefault(g, len(ids)) for g in exclusive], dtype=np.int64)
