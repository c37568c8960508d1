"""Baselines the quality benchmark compares xmctag against, computed in the same run on the same split.

- ``tfidf_linear_svc``: TF-IDF (word 1-2 grams + char 2-5 grams) one-vs-rest LinearSVC, the strong lexical
  baseline of the issue tracker's reference table.
- ``zero_shot``: off-the-shelf encoder embeddings of products and label texts, nearest labels by inner product.

Both return an ``(n_rows, k)`` int array of label indices, best first.
"""

from __future__ import annotations

import time

import numpy as np


def tfidf_linear_svc(train_texts, train_labels, test_texts, n_labels: int, k: int = 5, C: float = 1.0,
                     n_jobs: int = -1):
    """One LinearSVC per label that has a positive; ``train_labels`` is a list of int arrays.

    liblinear fits one label in ~1 s on EURLEX57K titles, so the labels are split over ``n_jobs`` processes.
    """
    import scipy.sparse as sp
    from joblib import Parallel, delayed
    from sklearn.feature_extraction.text import TfidfVectorizer

    t0 = time.time()
    words = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True, dtype=np.float32)
    chars = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), min_df=2, sublinear_tf=True, dtype=np.float32)
    x_train = sp.hstack([words.fit_transform(train_texts), chars.fit_transform(train_texts)]).tocsr()
    x_test = sp.hstack([words.transform(test_texts), chars.transform(test_texts)]).tocsr()
    # Row-normalise the concatenation so that both views weigh the same.
    x_train = _l2_rows(x_train)
    x_test = _l2_rows(x_test)
    rows = np.repeat(np.arange(len(train_labels)), [len(y) for y in train_labels])
    y = sp.csc_matrix((np.ones(len(rows), np.int8), (rows, np.concatenate(train_labels))),
                      shape=(len(train_labels), n_labels))
    labels = np.flatnonzero(np.diff(y.indptr))
    chunks = np.array_split(labels, max(1, len(labels) // 200))
    parts = Parallel(n_jobs=n_jobs)(delayed(_fit_labels)(x_train, y[:, chunk], x_test, C) for chunk in chunks)
    scores = np.full((len(test_texts), n_labels), -np.inf, dtype=np.float32)
    for chunk, part in zip(chunks, parts):
        scores[:, chunk] = part
    print(f"tfidf+LinearSVC: {x_train.shape[1]} features, {len(labels)} labels, {time.time() - t0:.0f}s", flush=True)
    return _top_k(scores, k)


def _fit_labels(x_train, y, x_test, C: float) -> np.ndarray:
    """Decision values on ``x_test`` of one LinearSVC per column of ``y`` (csc, every column has a positive)."""
    from sklearn.svm import LinearSVC

    out = np.empty((x_test.shape[0], y.shape[1]), dtype=np.float32)
    for j in range(y.shape[1]):
        target = y[:, j].toarray().ravel()
        if target.all():
            out[:, j] = np.inf
            continue
        svm = LinearSVC(C=C, loss="squared_hinge", dual=True, tol=1e-3, max_iter=200)
        out[:, j] = svm.fit(x_train, target).decision_function(x_test)
    return out


def zero_shot(encode, product_texts, label_texts, k: int = 5):
    """``encode(texts) -> (n, d)`` L2-normalised embeddings, e.g. ``xmctag.models.embedding.encode_texts``."""
    products = encode(product_texts)
    labels = encode(label_texts)
    return _top_k(products @ labels.T, k)


def _l2_rows(x):
    import scipy.sparse as sp

    norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
    return sp.diags(1.0 / np.maximum(norms, 1e-12)) @ x


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    part = np.argpartition(-scores, kth=min(k, scores.shape[1] - 1), axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)
