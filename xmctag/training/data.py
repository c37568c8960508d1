"""``TrainingData``: what a training run reads, checked before anything is written, then tokenised once.

``TrainingData.read(train, labels, dev, config)`` loads the label table, the training catalog and the optional dev
catalog (``xmctag.io.datasets``), refuses a label set that cannot be ranked, and computes the PSP propensities of
the training labels. After image fusion is prepared (``images``: the ``ImageInputs`` of each set, or None),
``tokenize(tokenizer, config)`` builds the token ids of the products, labels and dev products once for the run.
The stages take this one value instead of long argument lists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xmctag.config import Config
from xmctag.errors import UserError
from xmctag.evaluation.metrics import inverse_propensity
from xmctag.io.datasets import LabelledSet, LabelTable, load_labelled_set
from xmctag.models.image_inputs import ImageInputs
from xmctag.models.tokens import pad_id_of, token_ids
from xmctag.progress import Progress


@dataclass
class TrainingData:
    paths: dict[str, Path | None]  # "train", "labels", "dev" -> the file read
    labels: LabelTable
    train: LabelledSet
    dev: LabelledSet | None
    inv_p: np.ndarray  # inverse propensity of each label (PSP@k), from the training counts
    # image fusion: each set's image inputs (None: text only, or a set without images)
    train_images: ImageInputs | None = None
    dev_images: ImageInputs | None = None
    label_images: ImageInputs | None = None
    # tokenize(): token ids per item, and the padding id
    product_ids: list[list[int]] = field(default_factory=list)
    label_ids: list[list[int]] = field(default_factory=list)
    dev_ids: list[list[int]] | None = None
    pad_id: int = 0

    @classmethod
    def read(cls, train: str | Path, labels: str | Path, dev: str | Path | None, config: Config) -> "TrainingData":
        label_table = LabelTable.load(labels, config)
        train_set = load_labelled_set(train, config, label_table)
        dev_set = load_labelled_set(dev, config, label_table) if dev is not None else None
        _check_label_count(labels, label_table, train, train_set)
        inv_p = inverse_propensity(train_set.label_counts(len(label_table)), len(train_set), config.psp_a,
                                   config.psp_b)
        paths = {"train": Path(train), "labels": Path(labels), "dev": Path(dev) if dev is not None else None}
        return cls(paths, label_table, train_set, dev_set, inv_p)

    def report(self, show: Progress) -> None:
        """One log line per set: rows, rows skipped and why, label mentions not in the label table."""
        for name, data in (("train", self.train), ("dev", self.dev)):
            if data is None:
                continue
            skipped = ", ".join(f"{n} {reason}" for reason, n in data.skipped.items())
            show.log(f"{name}: {len(data)} rows from {self.paths[name]}"
                     + (f" (skipped: {skipped})" if skipped else "")
                     + (f"; {data.unknown_labels} label mention(s) not in the label table ignored"
                        if data.unknown_labels else ""))

    def tokenize(self, tokenizer, config: Config) -> None:
        """Token ids of every product, label and dev product (a decoder's prompt gets the image prefix on the rows
        that have a usable image)."""
        def ids(texts: list[str], max_length: int, images: ImageInputs | None) -> list[list[int]]:
            return token_ids(tokenizer, texts, max_length, images.has_image if images is not None else None)

        self.pad_id = pad_id_of(tokenizer)
        self.product_ids = ids(self.train.texts, config.max_length, self.train_images)
        self.label_ids = ids(self.labels.texts, config.label_max_length, self.label_images)
        self.dev_ids = ids(self.dev.texts, config.max_length, self.dev_images) if self.dev is not None else None

    def train_label_counts(self) -> np.ndarray:
        return self.train.label_counts(len(self.labels))


def _check_label_count(labels_path, label_table: LabelTable, train_path, train_set: LabelledSet) -> None:
    """A ranking needs two labels: with one, every in-batch negative is the positive itself, the loss is 0 and
    nothing is learnt."""
    if len(label_table) < 2:
        raise UserError(f"{labels_path}: the label table has {len(label_table)} label; a ranking needs at least 2")
    used = np.unique(np.concatenate(train_set.labels))
    if len(used) < 2:
        raise UserError(f"{train_path}: every training row carries the one label {label_table.ids[used[0]]!r}; "
                        "a ranking needs at least 2 distinct labels in training")
