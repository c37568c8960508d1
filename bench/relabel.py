"""Label-table updates without retraining, measured on EURLEX57K (issue 20, part 2).

    python bench/relabel.py prepare eurlex57k [--data ../shared/data] [--work bench/work] [--share 0.1] [--seed 0]
    python bench/relabel.py evaluate eurlex57k --kept export/eurlex-kept --full export/eurlex-full
           [--data ../shared/data] [--work bench/work] [--bundles DIR] [--variants ridge:votes,...] [--rows N]
           [--json FILE]

``prepare`` holds out ``--share`` of the labels that have at least 5 training products (chosen at random with
``--seed``): it writes ``<work>/relabel-<dataset>/`` with ``labels-kept.parquet`` (the label table without them),
``train-kept.parquet`` (the training rows with those labels removed from their label lists; rows left with no label
are dropped), ``dev-kept.parquet`` (the same for the dev rows: the kept run's ``--dev``, used to pick epochs and fit
the fusion, must not see the held-out labels either) and ``held_out.json`` (the held-out labels and the counts).
Train one run on the kept files and one on the full files, with the same settings, export both, then measure with
``evaluate``.

``evaluate`` relabels the kept bundle with the full label table (``xmctag.relabel``, once per ``--variants`` entry
``METHOD:votes|refit|novotes[:MIN_PRODUCTS]``, into ``--bundles``), and ranks the full dev set's texts (the bundle's
text columns) with each relabelled bundle, with the full bundle and with the kept bundle as it is (the kept encoder
embeds the texts once for it and its relabelled variants: their graphs are the same file; the full bundle too when
its graph is the same file, as with ``--epochs 0 --classifier-epochs 0``). Top 20 labels per
product, then:

- **held-out labels** H, over the dev rows with at least one true label in H (truth restricted to H; the ranking is
  the bundle's whole top 5): ``R@5`` = mean of |top 5 ∩ truth ∩ H| / |truth ∩ H|; ``PSP@5`` = sum over those rows of
  the inverse propensities of the hits in the top 5 that are in H, divided by the same sum for the best possible
  top 5 (the row's labels in H by inverse propensity); propensities (A 0.55, B 1.5) from the full training set's
  counts; how many labels of H are predicted (in some top 5) at all, how many correctly, of those in the dev truth;
  and the precision of the top-5 predictions that are in H;
- **the other labels**, over the dev rows with at least one true label outside H (truth without H): "as tagged"
  takes the top 5 as tagged (a held-out label in it counts as a miss: the places new labels take), "H removed"
  drops the held-out labels from the top 20 first and takes the first 5 left; P@1, P@5, PSP@5;
- **all labels**: the top 5 as tagged against the full truth, all dev rows with a label (P@1, P@5, PSP@5).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def prepare(data: Path, work: Path, share: float, seed: int) -> dict:
    import polars as pl

    train = pl.read_parquet(data / "train.parquet")
    labels = pl.read_parquet(data / "labels.parquet")
    counts = train.select(pl.col("labels").explode().alias("label")).group_by("label").len()
    eligible = sorted(counts.filter(pl.col("len") >= 5)["label"].to_list())
    rng = np.random.default_rng(seed)
    held = sorted(rng.choice(eligible, size=round(share * len(eligible)), replace=False).tolist())
    held_set = set(held)
    def without_held(frame: pl.DataFrame) -> pl.DataFrame:
        return (frame.with_columns(pl.col("labels").list.eval(pl.element().filter(~pl.element().is_in(held))))
                .filter(pl.col("labels").list.len() > 0))

    kept_train = without_held(train)
    kept_dev = without_held(pl.read_parquet(data / "dev.parquet"))
    work.mkdir(parents=True, exist_ok=True)
    labels.filter(~pl.col("label").is_in(held)).write_parquet(work / "labels-kept.parquet")
    kept_train.write_parquet(work / "train-kept.parquet")
    kept_dev.write_parquet(work / "dev-kept.parquet")
    report = {"seed": seed, "share": share, "eligible_labels": len(eligible), "held_out": held,
              "labels_full": labels.height, "labels_kept": labels.height - len(held_set),
              "train_rows_full": train.height, "train_rows_kept": kept_train.height, "dev_rows_kept": kept_dev.height}
    (work / "held_out.json").write_text(json.dumps(report, indent=1))
    return report


TOP_K = 20


def held_out_metrics(top: np.ndarray, truth: list[np.ndarray], held: np.ndarray, inv_p: np.ndarray) -> dict:
    """The held-out labels' figures of ``top`` ``(n, >= 5)`` (global label indices, -1 = none); see the docstring."""
    from xmctag.evaluation.metrics import hit_matrix, psp_at, recall_at

    top5 = top[:, :5]
    in_h = [t[held[t]] for t in truth]
    rows = np.array([i for i, t in enumerate(in_h) if len(t)], dtype=np.int64)
    th = [in_h[i] for i in rows]
    hits = hit_matrix(top5[rows], th)
    predicted = top5[(top5 >= 0)]
    predicted_h = np.unique(predicted[held[predicted]])
    correct = np.unique(top5[rows][hits])
    all_hits = hit_matrix(top5, in_h)
    held_predictions = int(((top5 >= 0) & held[np.maximum(top5, 0)]).sum())
    return {"rows": len(rows), "R@5": recall_at(hits, th, 5), "PSP@5": psp_at(top5[rows], hits, th, inv_p, 5),
            "labels": int(held.sum()), "labels_in_dev_truth": len(np.unique(np.concatenate(th))) if th else 0,
            "labels_predicted": len(predicted_h), "labels_predicted_correctly": len(correct),
            "predictions": held_predictions,
            "precision_of_predictions": float(all_hits.sum() / held_predictions) if held_predictions else 0.0}


def rest_metrics(top: np.ndarray, truth: list[np.ndarray], held: np.ndarray, inv_p: np.ndarray) -> dict:
    """P@1, P@5, PSP@5 on the labels outside H: "as tagged" and "H removed" (see the docstring)."""
    from xmctag.evaluation.metrics import evaluate_rankings

    rest = [t[~held[t]] for t in truth]
    rows = np.array([i for i, t in enumerate(rest) if len(t)], dtype=np.int64)
    tr = [rest[i] for i in rows]
    is_held = (top >= 0) & held[np.maximum(top, 0)]
    order = np.argsort(is_held, axis=1, kind="stable")  # the others first, in their order
    removed = np.take_along_axis(top, order, axis=1)
    removed[np.take_along_axis(is_held, order, axis=1)] = -1
    keys = ("P@1", "P@5", "PSP@5")
    tagged = evaluate_rankings(top[rows, :5], tr, (1, 5), inv_p)
    cut = evaluate_rankings(removed[rows, :5], tr, (1, 5), inv_p)
    return {"rows": len(rows), "as_tagged": {k: tagged[k] for k in keys}, "held_removed": {k: cut[k] for k in keys}}


def all_metrics(top: np.ndarray, truth: list[np.ndarray], inv_p: np.ndarray) -> dict:
    from xmctag.evaluation.metrics import evaluate_rankings

    rows = np.array([i for i, t in enumerate(truth) if len(t)], dtype=np.int64)
    m = evaluate_rankings(top[rows, :5], [truth[i] for i in rows], (1, 5), inv_p)
    return {"rows": len(rows), **{k: m[k] for k in ("P@1", "P@5", "PSP@5")}}


def evaluate(data: Path, work: Path, kept: Path, full: Path, bundles: Path, variants: list[tuple[str, str, int]],
             rows: int | None = None) -> dict:
    import polars as pl

    import xmctag
    from xmctag import Tagger
    from xmctag.evaluation.metrics import inverse_propensity
    from xmctag.io.datasets import product_text_expr

    held_ids = json.loads((work / "held_out.json").read_text())["held_out"]
    label_ids = pl.read_parquet(data / "labels.parquet")["label"].cast(pl.String).to_list()
    index = {label: i for i, label in enumerate(label_ids)}
    held = np.zeros(len(label_ids), dtype=bool)
    held[[index[x] for x in held_ids]] = True
    train = pl.read_parquet(data / "train.parquet", columns=["labels"])
    counts = np.bincount([index[x] for row in train["labels"].to_list() for x in row if x in index],
                         minlength=len(label_ids))
    inv_p = inverse_propensity(counts, train.height)
    kept_tagger = Tagger.load(kept, device="cpu")
    config = kept_tagger.config
    dev = (pl.read_parquet(data / "dev.parquet")
           .select(product_text_expr(config.text_cols).alias("text"), pl.col(config.labels_col).alias("labels"))
           .filter(pl.col("text").is_not_null()))
    if rows:
        dev = dev.head(rows)
    texts = dev["text"].to_list()
    truth = [np.array(sorted({index[str(x)] for x in row or [] if str(x) in index}), dtype=np.int64)
             for row in dev["labels"].to_list()]

    def ranked(tagger, embeddings) -> tuple[np.ndarray, float]:
        started = time.perf_counter()
        top, _ = tagger.rank(embeddings, TOP_K, None, tagger.lexical_candidates(texts))
        to_global = np.array([index[x] for x in tagger.label_ids.tolist()], dtype=np.int64)
        return np.where(top >= 0, to_global[np.maximum(top, 0)], -1), time.perf_counter() - started

    def embedded(tagger) -> tuple[np.ndarray, float]:
        started = time.perf_counter()
        return tagger.embed(texts), time.perf_counter() - started

    results: dict = {"dev_rows": len(texts), "held_out_labels": int(held.sum()), "runs": {}}

    def record(name: str, top: np.ndarray, seconds: dict) -> None:
        results["runs"][name] = {"held_out": held_out_metrics(top, truth, held, inv_p),
                                 "rest": rest_metrics(top, truth, held, inv_p), "all": all_metrics(top, truth, inv_p),
                                 "seconds": seconds}
        print(name, json.dumps(results["runs"][name]), flush=True)

    embeddings, embed_s = embedded(kept_tagger)
    kept_manifest = kept_tagger.manifest
    top, rank_s = ranked(kept_tagger, embeddings)
    record("kept", top, {"embed": embed_s, "rank": rank_s})
    del kept_tagger
    full_tagger = Tagger.load(full, device="cpu")
    same = ("graph", "tokenization")  # the same encoder graph and tokenisation: the same embeddings
    if all(full_tagger.manifest[key] == kept_manifest[key] for key in same) and \
            full_tagger.manifest["files"]["encoder.onnx"] == kept_manifest["files"]["encoder.onnx"]:
        full_embeddings, embed_s = embeddings, 0.0
        results["full_shares_the_kept_encoder"] = True
    else:
        full_embeddings, embed_s = embedded(full_tagger)
    top, rank_s = ranked(full_tagger, full_embeddings)
    record("full", top, {"embed": embed_s, "rank": rank_s})
    del full_tagger, full_embeddings
    for method, votes, floor in variants:
        refit = votes == "refit"
        name = f"relabel-{method}-{votes or 'novotes'}" + (f"-min{floor}" if floor else "")
        report = xmctag.relabel(kept, data / "labels.parquet", bundles / name, overwrite=True, vectors=method,
                                votes=bool(votes), min_products=floor, refit=refit, progress=False)
        tagger = Tagger.load(bundles / name, device="cpu")
        top, rank_s = ranked(tagger, embeddings)
        record(name, top, {"relabel": report.seconds, "rank": rank_s})
        results["runs"][name]["relabel"] = {"vectors": report.vectors, "votes": report.votes,
                                            "kept": report.kept, "added": report.added, "retired": report.retired}
        del tagger
    return results


def markdown(results: dict) -> str:
    header = ("| bundle | H: R@5 | H: PSP@5 | H predicted / correct / in dev | H precision | rest as tagged: P@1 / "
              "P@5 / PSP@5 | rest, H removed: P@1 / P@5 / PSP@5 | all: P@1 / P@5 / PSP@5 |")
    lines = [header,
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, run in results["runs"].items():
        h, r, a = run["held_out"], run["rest"], run["all"]

        def three(m):
            return " / ".join(f"{100 * m[k]:.2f}" for k in ("P@1", "P@5", "PSP@5"))

        lines.append(f"| {name} | {100 * h['R@5']:.2f} | {100 * h['PSP@5']:.2f} | {h['labels_predicted']} / "
                     f"{h['labels_predicted_correctly']} / {h['labels_in_dev_truth']} | "
                     f"{100 * h['precision_of_predictions']:.2f} | {three(r['as_tagged'])} | "
                     f"{three(r['held_removed'])} | {three(a)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("dataset")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--work", type=Path, default=ROOT / "bench" / "work")
    p.add_argument("--share", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    e = sub.add_parser("evaluate")
    e.add_argument("dataset")
    e.add_argument("--kept", type=Path, required=True, help="bundle trained on the kept labels")
    e.add_argument("--full", type=Path, required=True, help="bundle trained on the full label table")
    e.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    e.add_argument("--work", type=Path, default=ROOT / "bench" / "work")
    e.add_argument("--bundles", type=Path, default=None, help="where the relabelled bundles go [<work>/relabel-"
                   "<dataset>/bundles]")
    e.add_argument("--variants", default="ridge:votes,scaled:votes,text:votes,ridge:novotes")
    e.add_argument("--rows", type=int, default=None, help="only the first N dev rows")
    e.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.command == "prepare":
        report = prepare(args.data / args.dataset, args.work / f"relabel-{args.dataset}", args.share, args.seed)
        print(json.dumps({k: v for k, v in report.items() if k != "held_out"}))
    elif args.command == "evaluate":
        from common import print_header

        work = args.work / f"relabel-{args.dataset}"
        variants = [(v.split(":")[0], {"novotes": ""}.get(v.split(":")[1], v.split(":")[1]),
                     int(v.split(":")[2]) if v.count(":") > 1 else 0) for v in args.variants.split(",") if v]
        results = evaluate(args.data / args.dataset, work, args.kept, args.full, args.bundles or work / "bundles",
                           variants, args.rows)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
        print_header(f"Relabel on {args.dataset}")
        print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
