"""The lexical model (``xmctag.lexical``) on its own: settings compared on a dev split, and its speed at 100k+ labels.

    python bench/lexical.py compare eurlex57k [--data ../shared/data] [--variants parabel bonsai]
    python bench/lexical.py scale [--labels 100000] [--rows 200000]

``compare``: for each variant, the features and label trees that ``xmctag train`` builds (``train_lexical``, title
only) on train, then P@1/3/5, PSP@1/3/5 of the lexical ranking alone on dev, training seconds and prediction
ms/product (one thread, as tagging runs it). Variants: ``bonsai`` (the default: 3 trees, 100 children per node,
unbalanced, depth 3) and ``parabel`` (3 trees, 2 balanced children, depth 20).

``scale``: a synthetic catalog whose labels each have their own three-word signature (drawn from a 60k-word
vocabulary); a product names the signatures of 1-3 labels among 4-8 noise words. Labels follow a Zipf-like
frequency, so most are rare, as in real label sets. Reports feature and tree training seconds, prediction
ms/product, the model's size on disk and P@1 on held-out products. Building the catalog draws each row's labels
with ``rng.choice(p=...)`` over all labels (about 18 minutes for 100k rows at 100k labels): vectorise it before
going larger.

Each prints the machine and date, then a markdown table for bench/RESULTS.md ("Lexical model").
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import markdown_table, print_header

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {"bonsai": {"lexical_cluster_k": 100, "lexical_cluster_balanced": False, "lexical_max_depth": 3},
            "parabel": {"lexical_cluster_k": 2, "lexical_cluster_balanced": True, "lexical_max_depth": 20}}
COLUMNS = ["P@1", "P@3", "P@5", "PSP@1", "PSP@3", "PSP@5"]


def compare(args) -> None:
    import xmctag
    from xmctag.evaluation.metrics import evaluate_rankings, inverse_propensity
    from xmctag.io.datasets import LabelTable, load_labelled_set
    from xmctag.training.lexical import train_lexical

    data = args.data / args.dataset
    config = xmctag.Config(vision="none")
    labels = LabelTable.load(data / "labels.parquet", config)
    train = load_labelled_set(data / "train.parquet", config, labels)
    dev = load_labelled_set(data / "dev.parquet", config, labels)
    inv_p = inverse_propensity(train.label_counts(len(labels)), len(train), config.psp_a, config.psp_b)
    print_header(f"lexical model alone on {args.dataset} (dev, title only)")
    print(f"- {len(train)} train / {len(dev)} dev rows, {len(labels)} labels")
    rows = []
    for name in args.variants:
        variant = xmctag.Config(vision="none", **VARIANTS[name])
        with tempfile.TemporaryDirectory() as folder:
            started = time.perf_counter()
            model = train_lexical(train.texts, train.labels, len(labels), variant, Path(folder) / "lexical")
            fit = time.perf_counter() - started
            started = time.perf_counter()
            top, _ = model.predict(dev.texts)
            per_row = (time.perf_counter() - started) / len(dev) * 1000
        m = evaluate_rankings(top[:, :5], dev.labels, (1, 3, 5), inv_p)
        rows.append([f"{name} ({VARIANTS[name]})", *(f"{100 * m[c]:.2f}" for c in COLUMNS), f"{fit:.0f}",
                     f"{per_row:.2f}", f"{model.features.n_features:,}"])
    print(markdown_table(["variant", *COLUMNS, "train s", "predict ms/product", "features"], rows))


def synthetic(rng, n_labels: int, rows: int, vocabulary: int = 60_000):
    """Texts and label lists of the ``scale`` catalog (see the module docstring)."""
    words = np.array([f"w{i}" for i in range(vocabulary)])
    signatures = rng.integers(0, vocabulary, size=(n_labels, 3))
    popularity = 1.0 / np.arange(1, n_labels + 1) ** 0.8
    popularity /= popularity.sum()
    texts, labels = [], []
    for _ in range(rows):
        chosen = np.unique(rng.choice(n_labels, size=rng.integers(1, 4), p=popularity))
        tokens = list(words[signatures[chosen].ravel()]) + list(words[rng.integers(0, vocabulary, rng.integers(4, 9))])
        rng.shuffle(tokens)
        texts.append(" ".join(tokens))
        labels.append(chosen)
    return texts, labels


def scale(args) -> None:
    import xmctag
    from xmctag.training.lexical import train_lexical

    rng = np.random.default_rng(0)
    texts, labels = synthetic(rng, args.labels, args.rows + args.test_rows)
    train_texts, train_labels = texts[:args.rows], labels[:args.rows]
    test_texts, test_labels = texts[args.rows:], labels[args.rows:]
    seen = len(np.unique(np.concatenate(train_labels)))
    print_header(f"lexical model at {args.labels:,} labels (synthetic, {args.rows:,} training products)")
    print(f"- labels seen in training: {seen:,}")
    config = xmctag.Config(vision="none")
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        model = train_lexical(train_texts, train_labels, args.labels, config, Path(folder) / "lexical")
        fit = time.perf_counter() - started
        size = sum(p.stat().st_size for p in (Path(folder) / "lexical").rglob("*") if p.is_file())
        started = time.perf_counter()
        top, _ = model.predict(test_texts)
        per_row = (time.perf_counter() - started) / len(test_texts) * 1000
    p1 = np.mean([top[i, 0] in set(test_labels[i].tolist()) for i in range(len(test_texts))])
    print(markdown_table(["labels", "train rows", "features", "train s (features + trees)", "predict ms/product",
                          "model MiB", "P@1"],
                         [[f"{args.labels:,}", f"{args.rows:,}", f"{model.features.n_features:,}", f"{fit:.0f}",
                           f"{per_row:.2f}", f"{size / 2**20:.0f}", f"{100 * p1:.2f}"]]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    c = commands.add_parser("compare")
    c.add_argument("dataset")
    c.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    c.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    s = commands.add_parser("scale")
    s.add_argument("--labels", type=int, default=100_000)
    s.add_argument("--rows", type=int, default=200_000)
    s.add_argument("--test-rows", type=int, default=2_000)
    args = parser.parse_args(argv)
    compare(args) if args.command == "compare" else scale(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
