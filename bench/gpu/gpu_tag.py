"""GPU tagging check: a bundle's fp16 graph through ONNX Runtime's CUDA provider against the fp32 graph on the CPU.

Two steps, driven by ``bench/gpu/gpu_tag.sh`` (which also carries the packages to the GPU machine):

    python bench/gpu/gpu_tag.py reference --bundle B --catalog C --out REF   # here, CPU, fp32 graph
    python bench/gpu/gpu_tag.py check --bundle B --catalog C --ref REF --out DIR [--rows N]   # there, --device cuda

``reference`` writes the catalog's image features, product embeddings and top-5 predictions (``Tagger`` on the CPU).
``check`` loads the same bundle with ``device="cuda"`` and reports, as Markdown on stdout and ``DIR/gpu_tag.json``:
the providers each session really runs on; parity (image features, embeddings: max abs diff and min cosine;
predictions: same top-1, same top-5 set, P@1/P@5 of both against the catalog's labels); then throughput of
``Tagger.tag_file`` on a synthetic text-only catalog of N rows (titles of C with a row number) for several encode
batch sizes, and of a fused catalog whose images are all in the cache (C's rows repeated).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import polars as pl

from xmctag import Tagger

TOP_K = 5


def _inputs(tagger: Tagger, catalog: Path, cache_dir: Path):
    """The catalog's rows that have an id and product text (the rows ``Tagger.tag`` tags), their product texts
    (``product_text_expr`` of the model's text columns, as ``Tagger.tag`` builds them), their image inputs and the
    ``BundleImages`` that made those."""
    from xmctag.io.datasets import product_text_expr

    config = tagger.config
    text = product_text_expr(list(config.text_cols))
    has_id = pl.col(config.id_col).cast(pl.String).str.strip_chars().str.len_chars().fill_null(0) > 0
    frame = pl.read_parquet(catalog).filter(has_id & text.is_not_null())
    texts = frame.select(text.alias("text"))["text"].to_list()
    vision = tagger.images(cache_dir)
    images = vision.features(frame[tagger.fusion["image_col"]].to_list(), catalog.parent)
    return frame, texts, images, vision


def reference(args) -> None:
    tagger = Tagger.load(args.bundle, device="cpu", precision="fp32")
    frame, texts, images, _ = _inputs(tagger, args.catalog, args.out / "image_cache")
    args.out.mkdir(parents=True, exist_ok=True)
    np.save(args.out / "image_features.npy", images[0])
    np.save(args.out / "embeddings.npy", tagger.embed(texts, images))
    indices, scores = tagger.predict(texts, TOP_K, images=images)
    np.save(args.out / "top_k.npy", indices)
    np.save(args.out / "scores.npy", scores)
    print(f"reference of {len(texts)} rows written to {args.out}")


def _precision_at(indices: np.ndarray, label_ids: np.ndarray, truth: list[list[str]], k: int) -> float:
    hits = [len(set(label_ids[row[:k]]) & set(t)) for row, t in zip(indices, truth)]
    return 100.0 * float(np.sum(hits)) / (k * len(truth))


def _rate(fn, rows: int) -> tuple[float, float]:
    started = time.perf_counter()
    fn()
    seconds = time.perf_counter() - started
    return rows / seconds, seconds


def check(args) -> None:
    import onnxruntime as ort

    out: dict = {"python": platform.python_version(), "onnxruntime": ort.__version__,
                 "available_providers": ort.get_available_providers()}
    try:
        import torch

        out["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    except ImportError:
        out["gpu"] = None
    started = time.perf_counter()
    tagger = Tagger.load(args.bundle, device=args.device)
    out["load_seconds"] = round(time.perf_counter() - started, 2)
    out["text_session_providers"] = tagger.session.get_providers()
    out["text_graph"] = Path(tagger.session._model_path).name
    out["encode_batch_size"] = tagger.encode_batch_size

    # Parity against the CPU fp32 reference, images embedded here on the GPU into an empty cache.
    started = time.perf_counter()
    frame, texts, images, vision = _inputs(tagger, args.catalog, args.out / "image_cache")
    out["image_seconds_cold"] = round(time.perf_counter() - started, 2)
    out["image_counts"] = vision.counts.to_dict()
    # The one private xmctag attribute read here: the vision graph's ONNX Runtime session is created on the first
    # picture to embed, and xmctag has no public handle on it (or on its providers).
    encoder = vision.encoder._encoder
    out["vision_session_providers"] = encoder.session.get_providers() if encoder else "not created (all cached)"
    ref = {name: np.load(args.ref / f"{name}.npy") for name in ("image_features", "embeddings", "top_k", "scores")}
    embeddings = tagger.embed(texts, images)
    indices, scores = tagger.predict(texts, TOP_K, images=images)
    truth = frame["labels"].to_list()

    def cosine_min(a, b):
        a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
        b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
        return float((a * b).sum(axis=1).min())

    out["parity"] = {
        "rows": len(texts),
        "image_features_max_abs": float(np.abs(images[0] - ref["image_features"]).max()),
        "image_features_min_cosine": cosine_min(images[0][:, 0], ref["image_features"][:, 0]),
        "embedding_max_abs": float(np.abs(embeddings - ref["embeddings"]).max()),
        "embedding_min_cosine": cosine_min(embeddings, ref["embeddings"]),
        "same_top1": float(np.mean(indices[:, 0] == ref["top_k"][:, 0])),
        "same_top5_set": float(np.mean([set(a) == set(b) for a, b in zip(indices, ref["top_k"])])),
        "score_max_abs": float(np.abs(scores - ref["scores"]).max()),
        "P@1 here": _precision_at(indices, tagger.label_ids, truth, 1),
        "P@1 reference (cpu fp32)": _precision_at(ref["top_k"], tagger.label_ids, truth, 1),
        "P@5 here": _precision_at(indices, tagger.label_ids, truth, 5),
        "P@5 reference (cpu fp32)": _precision_at(ref["top_k"], tagger.label_ids, truth, 5),
    }

    # Throughput: tag_file end to end (read, tokenise, encode, search, write) on synthetic catalogs.
    titles = frame["title"].to_list()
    text_only = args.out / "text_only.parquet"
    pl.DataFrame({"id": [str(i) for i in range(args.rows)],
                  "title": [f"{titles[i % len(titles)]} {i}" for i in range(args.rows)]}).write_parquet(text_only)
    throughput = []
    for encode_batch in args.encode_batches:
        tagger.encode_batch_size = encode_batch
        texts_sample = [f"{titles[i % len(titles)]} {i}" for i in range(min(args.rows, 50_000))]
        encode_rate, _ = _rate(lambda: tagger.embed(texts_sample), len(texts_sample))
        summary = tagger.tag_file(text_only, args.out / "text_only.predictions.parquet", top_k=TOP_K,
                                  progress=False)
        throughput.append({"catalog": f"text only, {args.rows:,} rows", "encode_batch": encode_batch,
                           "encoder products/s": round(encode_rate),
                           "tag_file products/s": round(summary.products_per_second)})
    tagger.encode_batch_size = out["encode_batch_size"]
    repeats = max(1, args.fused_rows // len(frame))
    fused = args.out / "fused.parquet"
    pl.concat([frame.with_columns(pl.col("id").cast(pl.String) + f"-{r}") for r in range(repeats)]) \
        .write_parquet(fused)
    (args.out / "image_cache").mkdir(exist_ok=True)
    summary = tagger.tag_file(fused, args.out / "fused.predictions.parquet", top_k=TOP_K, progress=False,
                              cache_dir=args.out / "image_cache")
    throughput.append({"catalog": f"title + image (cache warm), {repeats * len(frame):,} rows",
                       "encode_batch": tagger.encode_batch_size,
                       "tag_file products/s": round(summary.products_per_second), "images": summary.images})
    out["throughput"] = throughput
    (args.out / "gpu_tag.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    for name in ("reference", "check"):
        p = sub.add_parser(name)
        p.add_argument("--bundle", type=Path, required=True)
        p.add_argument("--catalog", type=Path, required=True)
        p.add_argument("--out", type=Path, required=True)
        if name == "check":
            p.add_argument("--ref", type=Path, required=True)
            p.add_argument("--device", default="cuda", help="cpu: a dry run of this script")
            p.add_argument("--rows", type=int, default=200_000)
            p.add_argument("--fused-rows", type=int, default=20_000)
            p.add_argument("--encode-batches", type=int, nargs="+", default=[64, 512, 2048])
    args = parser.parse_args()
    (reference if args.step == "reference" else check)(args)


if __name__ == "__main__":
    main()
