"""The lexical model: TF-IDF features of the product text and label trees over them, fused with the dense ranking.

Dense and lexical models make different mistakes (the dense one is stronger on rare labels, the lexical one on exact
terms); ``xmctag.scoring.ranking`` blends their scores with weights fitted on dev per label-frequency band
(``xmctag.training.lexical``). Tagging runs the lexical model per batch on the CPU, next to the encoder.

Files, in a run's and a bundle's ``lexical/`` folder (no pickle anywhere; the bundle manifest hashes each):

- ``features.json``: ``{"format": "xmctag-tfidf/1", "analyzers": [{"analyzer": "word" | "char_wb",
  "ngram_range": [lo, hi], "lowercase": true, "sublinear_tf": true, "vocabulary": [term, ...]}, ...]}``: a term's
  column is its position in ``vocabulary``; analyzers are concatenated in this order (``features.py``);
- ``idf_<i>.npy``: float32 ``(len(vocabulary),)`` inverse document frequencies of analyzer ``i``;
- ``trees/``: the label trees, omikuji's own directory format (``settings.json`` + ``tree*.cbor``; ``trees.py``);
- ``lexical.json``: ``{"format": "xmctag-lexical/1", "kind": "omikuji", "n_labels": L, "n_features": F,
  "settings": {...}, "fusion": {"bands": [e1, e2], "weights": [a0, a1, a2], "fitted_on": ...}}``: label ``l``'s
  fused score is ``(1 - a) * dense + a * lexical`` with ``a`` the weight of its band (training count ``<= e1``,
  ``<= e2``, above), ``model.py``;
- ``label_map.npy`` (relabelled bundles only, named in ``lexical.json``'s ``label_map``): int64, the trees' label
  index -> the bundle's label index, -1 for a retired label (``model.py``).
"""

from xmctag.lexical.model import LexicalModel, label_weights, read_label_map, write_label_map

__all__ = ["LexicalModel", "label_weights", "read_label_map", "write_label_map"]
