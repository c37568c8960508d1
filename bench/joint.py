"""Exploratory: does fine-tuning the encoder jointly with the label vectors (one-vs-all BCE, NGAME's classifier
stage) beat label vectors fitted on frozen embeddings? A benchmark script, not part of the product.

    python bench/joint.py --dataset ../shared/data/myntra [--run RUN] [--epochs 2] [--train-rows N]

Starts from ``--run``'s encoder (or the pretrained default encoder), fits label vectors on frozen embeddings as
``xmctag.train`` does (the baseline), then trains encoder + label vectors together with BCE over all labels and
evaluates on dev after each epoch: label vectors alone, and at the end with neighbour votes. Title only.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xmctag import run_dir as layout  # noqa: E402
from xmctag.config import Config  # noqa: E402
from xmctag.data import LabelTable, load_labelled_set  # noqa: E402
from xmctag.evaluation.evaluator import evaluate_scores  # noqa: E402
from xmctag.models.embedding import encode_ids  # noqa: E402
from xmctag.models.registry import load_pretrained  # noqa: E402
from xmctag.models.tokens import pad_id_of, token_ids  # noqa: E402
from xmctag.scoring import NeighbourLabels  # noqa: E402
from xmctag.training.label_vectors import LabelVectors, fit_label_vectors  # noqa: E402
from xmctag.training.trainer import _embed_with_grad, _warmup_linear_decay  # noqa: E402


def short(m: dict) -> str:
    return " / ".join(f"{k} {100 * m[k]:.2f}" for k in ("P@1", "P@3", "P@5", "PSP@5"))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", type=Path, required=True)
    p.add_argument("--run", type=Path, default=None)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--vector-lr", type=float, default=1e-3)
    p.add_argument("--train-rows", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = Config(vision="none")
    labels = LabelTable.load(args.dataset / "labels.parquet", config)
    train = load_labelled_set(args.dataset / "train.parquet", config, labels)
    dev = load_labelled_set(args.dataset / "dev.parquet", config, labels)
    if args.train_rows:
        keep = np.random.default_rng(0).permutation(len(train))[:args.train_rows]
        train_texts = [train.texts[i] for i in keep]
        train_labels = [train.labels[i] for i in keep]
    else:
        train_texts, train_labels = train.texts, train.labels
    counts = np.bincount(np.concatenate(train_labels), minlength=len(labels))
    inv_p = layout.inverse_propensities(counts, len(train_texts), config)
    if args.run:
        encoder, tokenizer = layout.load_run(args.run).encoder_and_tokenizer()
    else:
        from xmctag.models.decoder import prepare_model

        tokenizer, backbone = load_pretrained(config.encoder)
        tokenizer, encoder = prepare_model(tokenizer, backbone, config, torch.device("cpu"))
    pad_id = pad_id_of(tokenizer)
    product_ids = token_ids(tokenizer, train_texts, config.max_length)
    label_ids = token_ids(tokenizer, labels.texts, config.label_max_length)
    dev_ids = token_ids(tokenizer, dev.texts, config.max_length)
    cpu = torch.device("cpu")

    started = time.perf_counter()
    label_emb = encode_ids(encoder, label_ids, pad_id)
    products = encode_ids(encoder, product_ids, pad_id)
    vectors = fit_label_vectors(products, train_labels, label_emb, scale=config.label_vector_scale,
                                epochs=config.label_vector_epochs, lr=config.label_vector_lr, seed=0)
    dev_emb = encode_ids(encoder, dev_ids, pad_id)
    neighbours = (products, NeighbourLabels.from_lists(train_labels))
    print(f"baseline ({time.perf_counter() - started:.0f}s): label vectors {short(evaluate_scores(dev_emb, vectors, dev.labels, config, inv_p))}"  # noqa: E501
          f" | + votes {short(evaluate_scores(dev_emb, vectors, dev.labels, config, inv_p, neighbours))}", flush=True)

    w = torch.nn.Parameter(torch.from_numpy(vectors.vectors.copy()))
    b = torch.nn.Parameter(torch.from_numpy(vectors.bias.copy()))
    scale = vectors.scale
    targets = np.zeros((len(train_texts), len(labels)), dtype=bool)
    for i, y in enumerate(train_labels):
        targets[i, y] = True
    optimizer = torch.optim.AdamW([{"params": [q for q in encoder.parameters() if q.requires_grad], "lr": args.lr},
                                   {"params": [w, b], "lr": args.vector_lr, "weight_decay": 0.0}], weight_decay=0.01)
    steps = args.epochs * -(-len(train_texts) // args.batch_size)
    scheduler = _warmup_linear_decay(optimizer, 50, steps)
    rng = np.random.default_rng(0)
    for epoch in range(args.epochs):
        encoder.train()
        started, total = time.perf_counter(), 0.0
        order = rng.permutation(len(train_texts))
        for n, start in enumerate(range(0, len(order), args.batch_size)):
            batch = order[start:start + args.batch_size]
            q = _embed_with_grad(encoder, [product_ids[i] for i in batch], pad_id, cpu)
            logits = scale * (q @ w.T + b)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                logits, torch.from_numpy(targets[batch]).float(), reduction="sum") / len(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * len(batch)
            if n % 100 == 0:
                print(f"  epoch {epoch + 1} step {n}: loss {float(loss.detach()):.4f} "
                      f"({(start + len(batch)) / (time.perf_counter() - started):.0f} products/s)", flush=True)
        encoder.eval()
        joint = LabelVectors(w.detach().numpy().copy(), b.detach().numpy().copy(), scale)
        dev_emb = encode_ids(encoder, dev_ids, pad_id)
        print(f"epoch {epoch + 1} ({time.perf_counter() - started:.0f}s, loss {total / len(order):.4f}): "
              f"label vectors {short(evaluate_scores(dev_emb, joint, dev.labels, config, inv_p))}", flush=True)
    products = encode_ids(encoder, product_ids, pad_id)
    neighbours = (products, NeighbourLabels.from_lists(train_labels))
    print(f"final + votes: {short(evaluate_scores(dev_emb, joint, dev.labels, config, inv_p, neighbours))}")
    refit = fit_label_vectors(products, train_labels, encode_ids(encoder, label_ids, pad_id),
                              scale=config.label_vector_scale, epochs=config.label_vector_epochs,
                              lr=config.label_vector_lr, seed=0)
    print(f"refit label vectors on the new encoder: {short(evaluate_scores(dev_emb, refit, dev.labels, config, inv_p))}"
          f" | + votes {short(evaluate_scores(dev_emb, refit, dev.labels, config, inv_p, neighbours))}")


if __name__ == "__main__":
    main()
