"""Label trees over sparse features: omikuji (the Rust library behind Annif's XMC backend; Parabel and Bonsai
style trees of one-vs-rest linear classifiers; the defaults are Bonsai's shape: 100 children per node, depth 3).
Training reads a temporary file in the Extreme Classification Repository format; the trees are saved in omikuji's
own directory format (JSON settings + CBOR trees, no pickle)."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from xmctag.errors import UserError


def omikuji():
    try:
        import omikuji
    except ImportError:  # a dependency of xmctag: only a broken environment lacks it
        raise UserError("the lexical model needs the omikuji package: pip install omikuji (or train with "
                        "--lexical none)") from None
    return omikuji


class LabelTrees:
    def __init__(self, model, n_labels: int):
        self.model, self.n_labels = model, n_labels
        # One thread per prediction: omikuji's parallel sum over trees is not in a fixed order, and the same
        # product must get the same scores on every run.
        model.init_prediction_thread_pool(1)

    @property
    def n_features(self) -> int:
        return int(self.model.n_features)

    @classmethod
    def train(cls, features, labels: list[np.ndarray], n_labels: int, trees: int = 3, cluster_k: int = 100,
              max_depth: int = 3, balanced: bool = False, threads: int | None = None) -> "LabelTrees":
        """``features`` ``(n, F)`` CSR with sorted indices; ``labels[i]``: label indices of row ``i`` (rows without
        a label are left out: they teach the trees nothing)."""
        lib = omikuji()
        params = lib.Model.default_hyper_param()
        params.n_trees, params.cluster_k, params.max_depth = trees, cluster_k, max_depth
        params.cluster_balanced = balanced
        folder = tempfile.mkdtemp(prefix="xmctag-lexical-")
        try:
            path = os.path.join(folder, "train.txt")
            write_xc_file(path, features, labels, n_labels)
            with quiet_native_output():
                model = lib.Model.train_on_data(path, params, n_threads=threads)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return cls(model, n_labels)

    def predict(self, features, k: int, beam: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` label indices ``(n, k)`` (-1 where fewer) and scores in [0, 1] (float32), best first."""
        n = features.shape[0]
        top = np.full((n, k), -1, dtype=np.int64)
        scores = np.zeros((n, k), dtype=np.float32)
        indptr, indices, data = features.indptr, features.indices, features.data
        for i in range(n):
            lo, hi = indptr[i], indptr[i + 1]
            if lo == hi:
                continue
            found = self.model.predict(list(zip(indices[lo:hi].tolist(), data[lo:hi].tolist())), beam_size=beam,
                                       top_k=k)
            for j, (label, score) in enumerate(found):
                top[i, j], scores[i, j] = label, score
        return top, scores

    def save(self, folder: Path) -> None:
        with quiet_native_output():
            self.model.save(str(folder))

    @classmethod
    def load(cls, folder: Path, n_labels: int) -> "LabelTrees":
        lib = omikuji()
        with quiet_native_output():
            model = lib.Model.load(str(folder))
        return cls(model, n_labels)


def write_xc_file(path: str, features, labels: list[np.ndarray], n_labels: int) -> None:
    """The Extreme Classification Repository text format: a header ``rows features labels``, then per row
    ``l1,l2 f:v f:v ...``."""
    rows = [i for i, y in enumerate(labels) if len(y) and features.indptr[i + 1] > features.indptr[i]]
    indptr, indices, data = features.indptr, features.indices, features.data
    with open(path, "w") as file:
        file.write(f"{len(rows)} {features.shape[1]} {n_labels}\n")
        for i in rows:
            lo, hi = indptr[i], indptr[i + 1]
            pairs = " ".join(f"{f}:{v:.6g}" for f, v in zip(indices[lo:hi].tolist(), data[lo:hi].tolist()))
            file.write(",".join(str(int(x)) for x in labels[i]) + " " + pairs + "\n")


@contextlib.contextmanager
def quiet_native_output():
    """Sends what native code writes to file descriptors 1 and 2 (omikuji logs every load and draws progress bars
    while training) to a temporary file, dropped afterwards."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as sink:
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
