"""Image fusion benchmark: title-only vs title+image on Myntra dev, with full titles and with weak titles.

    python bench/images.py [--data ../shared/data] [--work bench/work/images] [--cache-dir DIR] [--budget 8]
    python bench/images.py --views weak --set knn_neighbours=0

For each view of the catalog (``full``: the titles as they are; ``weak``: each title cut to its first two words,
usually brand and gender, the case of marketplace listings with poor titles; train and dev both get the view) it
trains two models through the public API with the same settings and the same fine-tuning budget (``epochs="auto"``
within ``--budget`` minutes): ``vision="none"`` (title only) and ``vision="auto"`` (title + the product image as one
token, EfficientNet-Lite0 features). Each is exported and tags the dev catalog exactly as ``xmctag tag`` does; the
table has P@1, P@5, PSP@5 (``xmctag.evaluate``, propensities from the training catalog) and, per facet (colour,
usage, article type), recall@5 (the true value is among the top 5) and accuracy (the best-ranked value of that
facet among the top 10 is the true one).

Cost of images: the training time of each model (image embedding is reported apart: with a warm ``--cache-dir`` it
is a cache lookup), and tagging throughput of each bundle on the whole training catalog with the image cache warm
(products/s), fused vs text-only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from common import markdown_table, parse_overrides, print_header

ROOT = Path(__file__).resolve().parent.parent
FACETS = {"colour": "baseColour:", "usage": "usage:", "article type": "articleType:"}


def weak_titles(table):
    """The same rows with each title cut to its first two words."""
    import pyarrow as pa

    titles = [" ".join((t or "").split()[:2]) or None for t in table.column("title").to_pylist()]
    return table.set_column(table.schema.get_field_index("title"), "title", pa.array(titles, pa.large_string()))


def facet_scores(preds_path: Path, truth_path: Path) -> dict[str, float]:
    """Per facet: recall@5 and accuracy of the best-ranked value (see the module docstring)."""
    import pyarrow.parquet as pq

    preds = dict(zip(*[pq.read_table(preds_path).column(c).to_pylist() for c in ("id", "labels")]))
    truth = pq.read_table(truth_path, columns=["id", "labels"])
    out = {}
    for facet, prefix in FACETS.items():
        recall = accuracy = n = 0
        for row_id, labels in zip(truth.column("id").to_pylist(), truth.column("labels").to_pylist()):
            true = [x for x in labels if x.startswith(prefix)]
            if not true:
                continue
            ranked = [x for x in preds.get(row_id, []) if x.startswith(prefix)]
            n += 1
            recall += bool(set(true) & set(preds.get(row_id, [])[:5]))
            accuracy += bool(ranked) and ranked[0] in true
        out[f"{facet} R@5"] = recall / max(n, 1)
        out[f"{facet} acc"] = accuracy / max(n, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "myntra")
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "images")
    parser.add_argument("--cache-dir", type=Path, default=None, help="image cache shared by all runs "
                        "(default: --work/image_cache); `xmctag embed-images` can fill it beforehand")
    parser.add_argument("--budget", type=float, default=8.0, help="fine-tuning minutes per model (epochs=auto)")
    parser.add_argument("--views", nargs="+", default=["full", "weak"], choices=["full", "weak"])
    parser.add_argument("--modes", nargs="+", default=["title", "image"], choices=["title", "image"],
                        help="title only and/or title + image")
    parser.add_argument("--vision", default="auto", help="vision model of the title + image runs "
                        "(auto: the default, when the catalog has images)")
    parser.add_argument("--throughput-rows", type=int, default=0, help="rows tagged for throughput (0: all train)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="Config overrides (all runs)")
    args = parser.parse_args(argv)

    import pyarrow.parquet as pq

    import xmctag

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    cache_dir = (args.cache_dir or work / "image_cache").resolve()
    labels_path = args.data / "labels.parquet"
    print_header("image fusion on myntra (dev split): title only vs title + image")
    print(f"- same settings for every model: epochs=auto within {args.budget:g} min, image cache {cache_dir}"
          f"{', ' + ' '.join(args.set) if args.set else ''}")
    print()
    quality_rows, cost_rows, summary = [], [], {}
    for view in args.views:
        paths = {}
        for split in ("train", "dev"):
            table = pq.read_table(args.data / f"{split}.parquet")
            paths[split] = work / f"{split}.{view}.parquet"
            pq.write_table(weak_titles(table) if view == "weak" else table, paths[split])
        for mode, vision in (("title", "none"), ("title + image", args.vision)):
            if ("title" if vision == "none" else "image") not in args.modes:
                continue
            name = f"{view} titles, {mode}"
            tag = f"{view}-{'text' if vision == 'none' else 'image'}"
            config = xmctag.Config(vision=vision, image_cache_dir=str(cache_dir), time_budget_minutes=args.budget,
                                   **parse_overrides(args.set))
            run, bundle, preds = work / f"run-{tag}", work / f"bundle-{tag}", work / f"dev.{tag}.parquet"
            started = time.perf_counter()
            result = xmctag.train(paths["train"], labels_path, run, dev=paths["dev"], config=config, overwrite=True)
            train_seconds = time.perf_counter() - started
            xmctag.export(run, bundle, overwrite=True)
            tagger = xmctag.Tagger.load(bundle, device="cpu")
            tagger.tag_file(paths["dev"], preds, top_k=10)
            report = xmctag.evaluate(preds, paths["dev"], train=paths["train"])
            metrics = dict(report.metrics, **facet_scores(preds, paths["dev"]))
            throughput_path = paths["train"]
            if args.throughput_rows:
                throughput_path = work / f"throughput.{view}.parquet"
                pq.write_table(pq.read_table(paths["train"]).slice(0, args.throughput_rows), throughput_path)
            tag_summary = tagger.tag_file(throughput_path, work / f"throughput.{tag}.parquet", top_k=5)
            history = json.loads((run / "metrics.json").read_text())
            fusion = json.loads((run / "fusion.json").read_text()) if (run / "fusion.json").exists() else {}
            summary[name] = {"metrics": metrics, "train_seconds": train_seconds, "epochs": history.get("epochs"),
                             "tag_products_per_s": tag_summary.rows_tagged / tag_summary.seconds,
                             "fusion": fusion, "history": result.history}
            quality_rows.append([name] + [f"{100 * metrics[k]:.2f}" for k in
                                          ("P@1", "P@5", "PSP@5", "colour R@5", "colour acc", "usage R@5",
                                           "usage acc", "article type R@5", "article type acc")])
            cost_rows.append([name, str(history.get("epochs")), f"{train_seconds / 60:.1f}",
                              f"{summary[name]['tag_products_per_s']:.0f}"])
            (work / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
            print(f"done: {name}", flush=True)
    print(markdown_table(["model", "P@1", "P@5", "PSP@5", "colour R@5", "colour acc", "usage R@5", "usage acc",
                          "article R@5", "article acc"], quality_rows))
    print()
    print(markdown_table(["model", "epochs", "train min", "tag products/s (cache warm)"], cost_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
