"""``LexicalModel``: TF-IDF features + label trees, and the weights that fuse its scores with the dense ones; saved
to and loaded from one ``lexical/`` folder (format in ``xmctag.lexical``)."""

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


@dataclass
class LexicalModel:
    features: TfidfFeatures
    trees: LabelTrees
    settings: dict  # how it was trained (trees, cluster_k, max_depth, min_df) and predicts (beam, candidates)
    fusion: dict = field(default_factory=dict)  # {"bands": [e1, e2], "weights": [a0, a1, a2], "fitted_on": ...}

    @property
    def candidates(self) -> int:
        return int(self.settings["candidates"])

    def predict(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """The lexical model's top ``candidates`` labels ``(n, C)`` (-1 where fewer) and scores in [0, 1]."""
        return self.trees.predict(self.features.transform(texts), self.candidates, int(self.settings["beam"]))

    def save(self, folder: Path) -> None:
        """Writes every file. A loaded model saved again can score 1 ulp differently (omikuji stores the weights
        it loaded in another layout): to change only the settings or fusion weights, ``save_spec``."""
        folder.mkdir(parents=True, exist_ok=True)
        self.features.save(folder)
        self.trees.save(folder / TREES)
        self.save_spec(folder)

    def save_spec(self, folder: Path) -> None:
        """Writes ``lexical.json`` (settings and fusion weights) only."""
        (folder / "lexical.json").write_text(json.dumps({
            "format": FORMAT, "kind": "omikuji", "n_labels": self.trees.n_labels,
            "n_features": self.features.n_features, "settings": self.settings, "fusion": self.fusion}, indent=2))

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
        return cls(features, trees, dict(spec["settings"]), dict(spec["fusion"]))

    def label_weights(self, train_counts: np.ndarray) -> np.ndarray:
        return label_weights(self.fusion, train_counts)


def label_weights(fusion: dict, train_counts: np.ndarray) -> np.ndarray:
    """Each label's lexical weight ``(L,)`` float64: the weight of its training-count band."""
    band = np.searchsorted(np.asarray(fusion["bands"], dtype=np.int64), np.asarray(train_counts), side="left")
    return np.asarray(fusion["weights"], dtype=np.float64)[band]
