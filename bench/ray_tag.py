"""The Ray Data engine (``tag --engine ray``) against the local engine on one machine. A benchmark script, not a
test; it prints the machine and date, then markdown tables for bench/RESULTS.md::

    python bench/ray_tag.py --bundle BUNDLE --work /tmp/raybench/work [--rows 20000] [--files 4] [--cpus 2]
        [--batch-size 1024] [--overhead-rows 4000]

The catalog (written under ``--work``, never into the repository): ``--rows`` products, ids ``r0000000``...,
titles cycling through the Myntra sample's (``catalogs/myntra-sample``, train then dev), split into ``--files``
Parquet files of equal size in ``WORK/catalog/`` and also written whole as ``WORK/whole.parquet``.

1. **Local engine**: ``Tagger.tag_file`` on the whole file (ONNX Runtime on all cores).
2. **Ray engine**, 1 and 2 actors, on the directory, on a local Ray of ``--cpus`` CPUs started once (its start-up
   timed apart): ``RayTagger.tag_file`` wall time, which includes starting the actors and loading the bundle in
   each; the output is compared with the local engine's (ids, labels, products whose scores differ by more than
   1e-6). products/s = products / that wall time; the local engine's likewise includes its ``Tagger.load``. The
   local engine runs again last (the load of a shared machine drifts).
3. **Overhead per block**: 1 actor on the first ``--overhead-rows`` products with blocks of 100 and of 2,000 rows:
   (time with small blocks - time with large blocks) / (blocks of the one - blocks of the other); the same for the
   local engine with batches of 100 and 2,000 rows, whose per-batch costs (a faiss search, the lexical model's
   thread, padding) the Ray figure includes too: the difference is Ray's own share. ``--overhead-only`` runs only
   this part (on the catalog a previous run wrote under ``--work``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
from common import markdown_table, print_header

ROOT = Path(__file__).resolve().parent.parent


def write_catalog(work: Path, rows: int, files: int) -> tuple[Path, Path]:
    sample = ROOT / "catalogs" / "myntra-sample"
    titles = pl.concat([pl.read_parquet(sample / f, columns=["title"]) for f in ("train.parquet", "dev.parquet")])
    titles = titles["title"].drop_nulls()
    catalog = pl.DataFrame({"id": [f"r{i:07d}" for i in range(rows)],
                            "title": titles.gather(np.arange(rows) % len(titles))})
    parts = work / "catalog"
    parts.mkdir(parents=True, exist_ok=True)
    per_file = -(-rows // files)
    for i in range(files):
        catalog.slice(i * per_file, per_file).write_parquet(parts / f"part-{i:03d}.parquet")
    catalog.write_parquet(work / "whole.parquet")
    return parts, work / "whole.parquet"


def compare(a: Path, b: Path) -> str:
    """How the predictions of ``a`` compare with ``b``'s: ids and labels, and products whose scores differ."""
    x, y = pl.read_parquet(a), pl.read_parquet(b)
    if x["id"].to_list() != y["id"].to_list():
        return "ids DIFFER"
    labels = sum(p != q for p, q in zip(x["labels"].to_list(), y["labels"].to_list()))
    diffs = np.array([np.abs(np.array(p) - np.array(q)).max() if len(p) == len(q) else np.inf
                      for p, q in zip(x["scores"].to_list(), y["scores"].to_list())])
    moved = int((diffs > 1e-6).sum())
    return (f"ids equal, labels {'equal' if not labels else f'differ in {labels} products'}, scores within 1e-6"
            + (f" except {moved} products (max {diffs.max():.4f})" if moved else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--overhead-rows", type=int, default=4000)
    parser.add_argument("--overhead-only", action="store_true")
    args = parser.parse_args()

    import ray

    print_header("Ray Data engine vs the local engine (bench/ray_tag.py)")
    print(f"command: {' '.join(sys.argv)}\n")
    if not args.overhead_only:
        engines(args)
    else:
        ray.init(num_cpus=args.cpus, include_dashboard=False, object_store_memory=500 * 1024 * 1024,
                 log_to_driver=False, logging_level=logging.WARNING)
    overhead(args, args.work / "whole.parquet")
    ray.shutdown()


def engines(args) -> None:
    """Parts 1 and 2 of the module docstring (starts the local Ray)."""
    import ray

    from xmctag import RayTagger, Tagger

    parts, whole = write_catalog(args.work, args.rows, args.files)
    results = []

    def local(name: str) -> None:
        started = time.perf_counter()
        summary = Tagger.load(args.bundle, device="cpu").tag_file(whole, args.work / name, progress=False,
                                                                  batch_size=args.batch_size)
        wall = time.perf_counter() - started
        results.append([f"local engine ({name.split('.')[0]})", "-", f"{wall:.1f}",
                        f"{summary.rows_tagged / wall:,.0f}", f"{summary.products_per_second:,.0f}",
                        "reference" if name == "local.parquet"
                        else compare(args.work / name, args.work / "local.parquet")])

    local("local.parquet")

    started = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, object_store_memory=500 * 1024 * 1024,
             log_to_driver=False, logging_level=logging.WARNING)
    ray_start = time.perf_counter() - started
    for actors in (1, 2):
        out = args.work / f"ray-{actors}.parquet"
        started = time.perf_counter()
        summary = RayTagger.load(args.bundle, device="cpu", actors=actors).tag_file(
            parts, out, progress=False, batch_size=args.batch_size)
        wall = time.perf_counter() - started
        results.append([f"ray engine, {actors} actor{'s' * (actors > 1)}", str(actors), f"{wall:.1f}",
                        f"{summary.rows_tagged / wall:,.0f}", f"{summary.products_per_second:,.0f}",
                        compare(out, args.work / "local.parquet")])
    local("local-again.parquet")  # the load of a shared machine drifts: the local engine before and after
    print(f"{args.rows} products in {args.files} files, blocks of {args.batch_size} rows; local Ray of "
          f"{args.cpus} CPUs started in {ray_start:.1f} s (not counted below)\n")
    print(markdown_table(["engine", "actors", "wall s", "products/s (wall)", "products/s (tagging loop)",
                          "output vs local"], results))



def overhead(args, whole: Path) -> None:
    from xmctag import RayTagger, Tagger

    subset = args.work / "overhead"
    subset.mkdir(exist_ok=True)
    pl.read_parquet(whole).head(args.overhead_rows).write_parquet(subset / "part-000.parquet")
    print()
    for engine in ("ray, 1 actor", "local"):
        timings = {}
        for block in (100, 2000):
            tagger = (RayTagger.load(args.bundle, device="cpu", actors=1) if engine != "local"
                      else Tagger.load(args.bundle, device="cpu"))
            started = time.perf_counter()
            tagger.tag_file(subset / "part-000.parquet" if engine == "local" else subset,
                            args.work / f"overhead-{block}.parquet", progress=False, batch_size=block)
            timings[block] = (time.perf_counter() - started, -(-args.overhead_rows // block))
        (small, n_small), (large, n_large) = timings[100], timings[2000]
        per_block = (small - large) / (n_small - n_large)
        print(f"overhead per block ({engine}, {args.overhead_rows} products): {n_small} blocks of 100 rows "
              f"{small:.1f} s, {n_large} blocks of 2000 rows {large:.1f} s -> {1000 * per_block:.0f} ms per block")


if __name__ == "__main__":
    main()
