"""A synthetic extreme-multi-label catalog the size of LF-AmazonTitles-131K, for the training-at-scale benchmark.

    python bench/synthetic_xmc.py write DIR [--labels 131073] [--train 294805] [--dev 10000] [--seed 0]

writes ``DIR/train.parquet`` and ``DIR/dev.parquet`` (``id``, ``title``, ``labels``: list of label ids) and
``DIR/labels.parquet`` (``label``, ``text``), xmctag's data contract. No such public set is available offline, so:

- words are pronounceable pseudo-words (syllables), so the encoder's tokenizer cuts them as it cuts real rare words;
  a word's use across label texts is Zipf-like (some words are in many labels, most in a few);
- a label's text is 2-4 words; labels come in topics of 32 whose texts share a topic word, so neighbouring labels
  are confusable, as product categories are;
- label frequency is long-tailed (Zipf, exponent 0.9, in a random order of the labels): a few labels are on
  thousands of products, most on a handful, some on none;
- a product has 1-6 labels (2.3 on average), mostly from one topic; its title holds one or two words of each of its
  labels (not always the whole text) plus 2-5 noise words, shuffled.

So a title carries its labels' words, with noise: a model that reads titles can learn it, and P@1/P@5 on dev show
whether training collapsed. ``train_bench`` in ``bench/scale.py`` trains on it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

SYLLABLES = [c + v for c in "bdfghklmnprstvz" for v in "aeiou"] + ["ka", "lo", "ri", "sen", "tor", "mar", "vel"]
TOPIC_SIZE = 32


def words(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` distinct pseudo-words of 2-4 syllables."""
    out: set[str] = set()
    while len(out) < n:
        k = rng.integers(2, 5, size=n)
        picks = rng.integers(0, len(SYLLABLES), size=(n, 4))
        out.update("".join(SYLLABLES[s] for s in row[:length]) for row, length in zip(picks, k))
    return rng.permutation(np.array(sorted(out)[:n]))  # word frequency (Zipf rank) unrelated to spelling


def zipf(n: int, exponent: float) -> np.ndarray:
    p = 1.0 / np.arange(1, n + 1) ** exponent
    return p / p.sum()


def make_labels(rng: np.random.Generator, n_labels: int, vocabulary: np.ndarray):
    """Label texts (2-4 words: a topic word shared by the topic's labels, then own words) -> (texts, word ids)."""
    n_topics = -(-n_labels // TOPIC_SIZE)
    topic_word = rng.choice(len(vocabulary), size=n_topics, p=zipf(len(vocabulary), 0.7))
    own = rng.choice(len(vocabulary), size=(n_labels, 3), p=zipf(len(vocabulary), 1.0))
    length = rng.integers(1, 4, size=n_labels)  # own words
    texts, label_words = [], []
    for i in range(n_labels):
        ids = [int(topic_word[i // TOPIC_SIZE]), *own[i, :length[i]].tolist()]
        texts.append(" ".join(vocabulary[ids]))
        label_words.append(ids)
    return texts, label_words


def make_products(rng: np.random.Generator, n: int, n_labels: int, label_words: list[list[int]],
                  vocabulary: np.ndarray, popularity: np.ndarray):
    """``n`` products -> (titles, label id lists)."""
    n_topics = -(-n_labels // TOPIC_SIZE)
    first = rng.choice(n_labels, size=n, p=popularity)
    extra = np.minimum(rng.poisson(1.3, size=n), 5)
    same_topic = rng.random(size=(n, 5)) < 0.7
    others = rng.choice(n_labels, size=(n, 5), p=popularity)
    in_topic = rng.integers(0, TOPIC_SIZE, size=(n, 5))
    noise_n = rng.integers(2, 6, size=n)
    noise = rng.integers(0, len(vocabulary), size=(n, 5))
    titles, labels = [], []
    for i in range(n):
        chosen = [int(first[i])]
        topic = first[i] // TOPIC_SIZE
        for j in range(extra[i]):
            if same_topic[i, j]:
                chosen.append(int(min(topic * TOPIC_SIZE + in_topic[i, j], n_labels - 1)))
            else:
                chosen.append(int(others[i, j]))
        chosen = sorted(set(chosen))
        tokens: list[int] = []
        for label in chosen:
            own = label_words[label]
            keep = rng.random(len(own)) < 0.6
            keep[rng.integers(len(own))] = True  # at least one word of each label
            tokens.extend(w for w, k in zip(own, keep) if k)
        tokens.extend(noise[i, :noise_n[i]].tolist())
        rng.shuffle(tokens)
        titles.append(" ".join(vocabulary[tokens]))
        labels.append([f"L{label}" for label in chosen])
    assert n_topics > 0
    return titles, labels


def write(folder: Path, n_labels: int, n_train: int, n_dev: int, seed: int = 0) -> None:
    import polars as pl

    rng = np.random.default_rng(seed)
    vocabulary = words(rng, 40_000)
    texts, label_words = make_labels(rng, n_labels, vocabulary)
    popularity = zipf(n_labels, 0.9)[rng.permutation(n_labels)]
    titles, labels = make_products(rng, n_train + n_dev, n_labels, label_words, vocabulary, popularity)
    folder.mkdir(parents=True, exist_ok=True)
    pl.DataFrame({"label": [f"L{i}" for i in range(n_labels)], "text": texts}).write_parquet(
        folder / "labels.parquet")
    ids = [f"P{i}" for i in range(n_train + n_dev)]
    for name, rows in (("train", slice(0, n_train)), ("dev", slice(n_train, n_train + n_dev))):
        pl.DataFrame({"id": ids[rows], "title": titles[rows], "labels": labels[rows]},
                     schema={"id": pl.String, "title": pl.String, "labels": pl.List(pl.String)}).write_parquet(
            folder / f"{name}.parquet")
    per_product = np.mean([len(x) for x in labels[:n_train]])
    seen = len({label for row in labels[:n_train] for label in row})
    print(f"{folder}: {n_labels:,} labels ({seen:,} seen in train), {n_train:,} train / {n_dev:,} dev products, "
          f"{per_product:.2f} labels per product")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    w = commands.add_parser("write")
    w.add_argument("folder", type=Path)
    w.add_argument("--labels", type=int, default=131_073)
    w.add_argument("--train", type=int, default=294_805)
    w.add_argument("--dev", type=int, default=10_000)
    w.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write(args.folder, args.labels, args.train, args.dev, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
