"""How a report's values are named and shown, the same way in every rendering (terminal table, HTML page).

``lookup(data, "products.added")``: a value of the report dict (``DiffReport.to_dict()``) by its dotted path (list
items by index: ``top_gainers.0.label``); ``display(value)``: its text (integers with thousands separators, floats
with 4 decimals, ``yes`` / ``no``, ``-`` for null); ``shown(text)``: text from a file (ids, labels) with control
characters written as escapes (``\\x1b``), so that it cannot drive a terminal or hide in a page.
"""

from __future__ import annotations

MISSING = "-"

# What the report's numbers are called, in the order both renderings show them: (name, key under "products" /
# "labels"), and the score statistics.
PRODUCT_ROWS = (("added (only in NEW)", "added"), ("removed (only in OLD)", "removed"),
                ("re-tagged (label set changed)", "retagged"), ("unchanged", "unchanged"),
                ("unchanged but reordered", "reordered"), ("best label changed", "top1_changed"),
                ("mean Jaccard of label sets", "mean_jaccard"), ("products in OLD", "old"),
                ("products in NEW", "new"), ("in both", "common"))
LABEL_ROWS = (("distinct labels in OLD", "old"), ("distinct labels in NEW", "new"),
              ("appeared (only in NEW)", "appeared"), ("disappeared (only in OLD)", "disappeared"),
              ("(product, label) pairs gained", "gains"), ("(product, label) pairs lost", "losses"),
              ("labels gained or lost", "changed"))
STATS = ("count", "mean", "std", "min", "p05", "p25", "p50", "p75", "p95", "max")


def lookup(data, key: str):
    """The value at dotted path ``key`` of nested dicts and lists (a ``KeyError`` / ``IndexError`` if absent)."""
    for part in key.split("."):
        data = data[int(part)] if isinstance(data, list) else data[part]
    return data


def display(value) -> str:
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.4f}"
    return shown(str(value))


def signed(value) -> str:
    """A change: ``+3`` / ``-2`` / ``0`` (integers), ``+0.0120`` (floats), ``-`` for null."""
    if value is None:
        return MISSING
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:+,}"
    return f"{value:+,.4f}"


def shown(text: str) -> str:
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
