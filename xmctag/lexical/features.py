"""TF-IDF features of product texts: word 1-2 grams and character 2-5 grams (within words), each block L2-normalised,
then their concatenation (so both views weigh the same). Fitted with scikit-learn's ``TfidfVectorizer``; saved as
JSON vocabularies and ``.npy`` idf vectors (format in ``xmctag.lexical``), so loading runs no code."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

FORMAT = "xmctag-tfidf/1"
ANALYZERS = (("word", (1, 2)), ("char_wb", (2, 5)))


class TfidfFeatures:
    def __init__(self, vectorizers: list):
        self.vectorizers = vectorizers

    @property
    def n_features(self) -> int:
        return sum(len(v.idf_) for v in self.vectorizers)

    @classmethod
    def fit(cls, texts: list[str], min_df: int = 2, max_features: int | None = None) -> "TfidfFeatures":
        """Vocabularies and idf from ``texts``: terms in at least ``min_df`` texts, at most ``max_features`` per
        analyzer (the most frequent)."""
        from sklearn.feature_extraction.text import TfidfVectorizer

        vectorizers = []
        for analyzer, ngrams in ANALYZERS:
            vectorizer = TfidfVectorizer(analyzer=analyzer, ngram_range=ngrams, min_df=min_df, sublinear_tf=True,
                                         max_features=max_features, dtype=np.float32)
            try:
                vectorizer.fit(texts)
            except ValueError:  # no term in min_df texts (a tiny catalog): this analyzer adds nothing
                continue
            vectorizer.idf_ = vectorizer.idf_.astype(np.float32).astype(np.float64)  # as saved: same features
            vectorizers.append(vectorizer)
        return cls(vectorizers)

    def transform(self, texts: list[str]):
        """``(n, n_features)`` float32 CSR, rows L2-normalised (an empty text is an empty row)."""
        import scipy.sparse as sp

        blocks = [l2_rows(v.transform(texts)) for v in self.vectorizers]
        if not blocks:
            return sp.csr_matrix((len(texts), 0), dtype=np.float32)
        matrix = l2_rows(sp.hstack(blocks, format="csr", dtype=np.float32))
        matrix.sort_indices()
        return matrix

    def save(self, folder: Path) -> None:
        analyzers = []
        for i, v in enumerate(self.vectorizers):
            vocabulary = [None] * len(v.vocabulary_)
            for term, column in v.vocabulary_.items():
                vocabulary[column] = term
            analyzers.append({"analyzer": v.analyzer, "ngram_range": list(v.ngram_range), "lowercase": v.lowercase,
                              "sublinear_tf": v.sublinear_tf, "vocabulary": vocabulary})
            np.save(folder / f"idf_{i}.npy", v.idf_.astype(np.float32), allow_pickle=False)
        (folder / "features.json").write_text(json.dumps({"format": FORMAT, "analyzers": analyzers},
                                                         ensure_ascii=False))

    @classmethod
    def load(cls, folder: Path) -> "TfidfFeatures":
        """Raises ``ValueError`` for a file that is not what ``save`` writes."""
        from sklearn.feature_extraction.text import TfidfVectorizer

        spec = json.loads((folder / "features.json").read_text())
        if not isinstance(spec, dict) or spec.get("format") != FORMAT:
            raise ValueError(f"features.json: not {FORMAT}")
        vectorizers = []
        for i, a in enumerate(spec["analyzers"]):
            if a["analyzer"] not in ("word", "char_wb") or not all(isinstance(t, str) for t in a["vocabulary"]):
                raise ValueError(f"features.json: analyzer {i} is not one xmctag writes")
            idf = np.load(folder / f"idf_{i}.npy", allow_pickle=False)
            if idf.shape != (len(a["vocabulary"]),):
                raise ValueError(f"idf_{i}.npy: shape {idf.shape}, vocabulary {len(a['vocabulary'])}")
            vectorizer = TfidfVectorizer(analyzer=a["analyzer"], ngram_range=tuple(a["ngram_range"]),
                                         lowercase=bool(a["lowercase"]), sublinear_tf=bool(a["sublinear_tf"]),
                                         vocabulary={t: j for j, t in enumerate(a["vocabulary"])}, dtype=np.float32)
            vectorizer.idf_ = idf.astype(np.float64)
            vectorizers.append(vectorizer)
        return cls(vectorizers)


def l2_rows(matrix):
    """CSR rows scaled to unit L2 norm (all-zero rows stay zero)."""
    import scipy.sparse as sp

    matrix = sp.csr_matrix(matrix, dtype=np.float32)
    norms = np.sqrt(np.asarray(matrix.multiply(matrix).sum(axis=1)).ravel())
    norms[norms == 0] = 1.0
    return sp.diags((1.0 / norms).astype(np.float32)) @ matrix
