"""Shared fixtures: a tiny random BERT with the real MiniLM tokenizer, and a small synthetic catalog.

The catalog is learnable: each product title names a colour, an article type and a brand, and its labels are the
colour and the article type (label texts "colour: red", "article: shirt", ...).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest

COLOURS = ["red", "blue", "green", "black", "white", "yellow", "pink", "grey"]
ARTICLES = ["shirt", "jeans", "shoes", "watch", "bag", "dress", "jacket", "socks", "cap", "belt"]
BRANDS = ["acme", "zeta", "nova", "orbit", "lumen"]


def make_catalog(n: int, seed: int) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        colour, article, brand = rng.choice(COLOURS), rng.choice(ARTICLES), rng.choice(BRANDS)
        rows.append({"id": f"p{seed}-{i}", "title": f"{brand} {colour} {article}",
                     "labels": [f"colour:{colour}", f"article:{article}"]})
    return pl.DataFrame(rows, schema={"id": pl.String, "title": pl.String, "labels": pl.List(pl.String)})


def make_labels() -> pl.DataFrame:
    labels = [f"colour:{c}" for c in COLOURS] + [f"article:{a}" for a in ARTICLES] + ["article:umbrella"]
    texts = [x.replace(":", ": ") for x in labels]
    alt = [["colour " + x.split(":")[1] + " tone"] if x.startswith("colour") else [] for x in labels]
    return pl.DataFrame({"label": labels, "text": texts, "alt_texts": alt})


@pytest.fixture(scope="session")
def minilm_tokenizer_dir() -> str:
    from xmctag.models.registry import resolve_model_path

    return resolve_model_path("builtin:minilm-l6")


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory, minilm_tokenizer_dir) -> str:
    """A 2-layer, 32-wide random BERT saved with the real MiniLM tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    out = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(minilm_tokenizer_dir)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def catalog_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("catalog")
    make_catalog(400, seed=1).write_parquet(out / "train.parquet")
    make_catalog(80, seed=2).write_parquet(out / "dev.parquet")
    make_labels().write_parquet(out / "labels.parquet")
    return out


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, catalog_dir, tiny_encoder_dir) -> Path:
    """A run trained on the synthetic catalog (shared by export/tag tests)."""
    from xmctag import Config, train

    out = tmp_path_factory.mktemp("runs") / "tiny"
    config = Config(encoder=tiny_encoder_dir, epochs=2, classifier_epochs=1, batch_size=32, lr=1e-3, warmup_steps=5,
                    max_length=16,
                    label_max_length=12, cluster_size=8, label_vector_epochs=10)
    train(catalog_dir / "train.parquet", catalog_dir / "labels.parquet", out, dev=catalog_dir / "dev.parquet",
          config=config, progress=False)
    return out


@pytest.fixture(scope="session")
def bundle_dir(trained_run, tmp_path_factory) -> Path:
    """``trained_run`` exported (fp32, fp16 and int8 graphs): read it, or tamper with a ``copy_of`` it."""
    from xmctag import export

    return export(trained_run, tmp_path_factory.mktemp("export") / "tiny", progress=False)


@pytest.fixture(scope="session")
def sys_is_unwritable() -> bool:
    """Whether files cannot be created in /sys (true on most machines, even as root): the real unwritable output
    directory the bad-output tests use."""
    import os
    import tempfile

    try:
        fd, name = tempfile.mkstemp(dir="/sys")
    except OSError:
        return True
    os.close(fd)
    os.unlink(name)
    return False


@pytest.fixture()
def copy_of(tmp_path):
    def copy(path: Path) -> Path:
        target = tmp_path / Path(path).name
        shutil.copytree(path, target)
        return target

    return copy
