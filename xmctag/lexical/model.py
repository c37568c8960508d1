"""``LexicalModel``: TF-IDF features + label trees, and the weights that fuse its scores with the dense ones; saved
to and loaded from one ``lexical/`` folder (format in ``xmctag.lexical``).

A bundle whose label table was changed after training (``xmctag relabel``) keeps the trees as they are and adds a
label map: ``label_map.npy``, int64 ``(trees' labels,)``, the tree label index -> the bundle's label index, -1 for a
retired label, named in ``lexical.json`` as ``"label_map": {"file": "label_map.npy", "n_labels": L}``. ``predict``
applies it (a retired label's candidate becomes -1, score 0); labels that no tree label maps to (added by relabel)
are never predicted by the trees: ``reachable`` says which labels the trees can return.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xmctag.lexical.features import TfidfFeatures
from xmctag.lexical.trees import LabelTrees

FORMAT = "xmctag-lexical/1"
FOLDER = "lexical"
TREES = "trees"
LABEL_MAP = "label_map.npy"


@dataclass
class LexicalModel:
    features: TfidfFeatures
    trees: LabelTrees
    settings: dict  # how it was trained (trees, cluster_k, max_depth, min_df) and predicts (beam, candidates)
    fusion: dict = field(default_factory=dict)  # {"bands": [e1, e2], "weights": [a0, a1, a2], "fitted_on": ...}
    # relabelled bundles: tree label index -> label index (-1: retired), and the number of labels (module docstring)
    label_map: np.ndarray | None = None
    mapped_labels: int | None = None

    @property
    def candidates(self) -> int:
        return int(self.settings["candidates"])

    @property
    def n_labels(self) -> int:
        """The labels its predictions index: the trees' own, or those of the label map."""
        return self.trees.n_labels if self.label_map is None else int(self.mapped_labels)

    def reachable(self) -> np.ndarray:
        """``(n_labels,)`` bool: the labels the trees can return (all of them without a label map)."""
        if self.label_map is None:
            return np.ones(self.n_labels, dtype=bool)
        out = np.zeros(self.n_labels, dtype=bool)
        out[self.label_map[self.label_map >= 0]] = True
        return out

    def predict(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """The lexical model's top ``candidates`` labels ``(n, C)`` (-1 where fewer) and scores in [0, 1]."""
        top, scores = self.trees.predict(self.features.transform(texts), self.candidates, int(self.settings["beam"]))
        if self.label_map is not None:
            top = np.where(top >= 0, self.label_map[np.maximum(top, 0)], -1)
            scores = np.where(top >= 0, scores, 0).astype(np.float32)
        return top, scores

    def save(self, folder: Path) -> None:
        """Writes every file. A loaded model saved again can score 1 ulp differently (omikuji stores the weights
        it loaded in another layout): to change only the settings or fusion weights, ``save_spec``."""
        folder.mkdir(parents=True, exist_ok=True)
        self.features.save(folder)
        self.trees.save(folder / TREES)
        self.save_spec(folder)

    def save_spec(self, folder: Path) -> None:
        """Writes ``lexical.json`` (settings and fusion weights) and, with a label map, ``label_map.npy``."""
        spec = {"format": FORMAT, "kind": "omikuji", "n_labels": self.trees.n_labels,
                "n_features": self.features.n_features, "settings": self.settings, "fusion": self.fusion}
        if self.label_map is not None:
            np.save(folder / LABEL_MAP, self.label_map.astype(np.int64))
            spec["label_map"] = {"file": LABEL_MAP, "n_labels": int(self.mapped_labels)}
        (folder / "lexical.json").write_text(json.dumps(spec, indent=2))

    @classmethod
    def load(cls, folder: Path) -> "LexicalModel":
        """Raises ``ValueError`` (or the reading library's error) for a folder that is not what ``save`` writes."""
        spec = json.loads((folder / "lexical.json").read_text())
        if not isinstance(spec, dict) or spec.get("format") != FORMAT or spec.get("kind") != "omikuji":
            raise ValueError(f"lexical.json: not {FORMAT}")
        features = TfidfFeatures.load(folder)
        if features.n_features != spec["n_features"]:
            raise ValueError(f"lexical.json: {spec['n_features']} features, features.json {features.n_features}")
        trees = LabelTrees.load(folder / TREES, int(spec["n_labels"]))
        if trees.n_features != features.n_features:
            raise ValueError(f"trees: {trees.n_features} features, features.json {features.n_features}")
        label_map, mapped = load_label_map(folder, spec, trees.n_labels)
        return cls(features, trees, dict(spec["settings"]), dict(spec["fusion"]), label_map, mapped)

    def label_weights(self, train_counts: np.ndarray) -> np.ndarray:
        return label_weights(self.fusion, train_counts)


def write_label_map(folder: Path, label_map: np.ndarray, n_labels: int) -> None:
    """Sets the label map of the saved model in ``folder`` (``label_map.npy`` and its entry in ``lexical.json``),
    without loading the trees: ``label_map`` maps the trees' label indices (-1: retired) to ``n_labels`` labels."""
    spec = json.loads((folder / "lexical.json").read_text())
    if len(label_map) != spec["n_labels"]:
        raise ValueError(f"a label map of {len(label_map)} labels for trees of {spec['n_labels']}")
    np.save(folder / LABEL_MAP, np.asarray(label_map, dtype=np.int64))
    spec["label_map"] = {"file": LABEL_MAP, "n_labels": int(n_labels)}
    (folder / "lexical.json").write_text(json.dumps(spec, indent=2))


def read_label_map(folder: Path) -> np.ndarray | None:
    """The saved model's label map in ``folder`` (checked), or None when it has none."""
    spec = json.loads((folder / "lexical.json").read_text())
    return load_label_map(folder, spec, int(spec["n_labels"]))[0]


def load_label_map(folder: Path, spec: dict, tree_labels: int) -> tuple[np.ndarray | None, int | None]:
    """``(label_map, n_labels)`` as ``lexical.json`` names them, checked (a bundle is untrusted input); ``(None,
    None)`` without one. Raises ``ValueError``."""
    entry = spec.get("label_map")
    if entry is None:
        return None, None
    if not (isinstance(entry, dict) and entry.get("file") == LABEL_MAP and isinstance(entry.get("n_labels"), int)
            and not isinstance(entry["n_labels"], bool) and entry["n_labels"] >= 1):
        raise ValueError(f"lexical.json: label_map must be {{'file': '{LABEL_MAP}', 'n_labels': L}}")
    mapped = entry["n_labels"]
    label_map = np.load(folder / LABEL_MAP, allow_pickle=False)
    if label_map.dtype != np.int64 or label_map.shape != (tree_labels,):
        raise ValueError(f"{LABEL_MAP}: {label_map.dtype} {label_map.shape}, expected int64 ({tree_labels},)")
    kept = label_map[label_map >= 0]
    if len(kept) and kept.max() >= mapped or (label_map < -1).any() or len(np.unique(kept)) != len(kept):
        raise ValueError(f"{LABEL_MAP}: not a map of distinct labels in -1..{mapped - 1}")
    return label_map, mapped


def label_weights(fusion: dict, train_counts: np.ndarray) -> np.ndarray:
    """Each label's lexical weight ``(L,)`` float64: the weight of its training-count band."""
    band = np.searchsorted(np.asarray(fusion["bands"], dtype=np.int64), np.asarray(train_counts), side="left")
    return np.asarray(fusion["weights"], dtype=np.float64)[band]
