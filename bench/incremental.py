"""Incremental nights (``tag --previous``) against full runs, and the cost of ``tag --evidence``. A benchmark script,
not a test; it prints the machine and date, then markdown tables for bench/RESULTS.md::

    python bench/incremental.py --bundle BUNDLE --titles /work/shared/data/myntra/train.parquet --work /tmp/inc \\
        [--rows 1000000] [--changed 0.02] [--added 1000] [--removed 1000] [--full-rows 50000] [--evidence-rows 5000]

Catalogs (written under ``--work``, never into the repository): night 1 has ``--rows`` products, ids
``m0000000``..., titles cycling through the titles of ``--titles`` (so a title repeats; ids are unique). Night 2 is
night 1 with ``--changed`` of its rows given a new title (`` (new season)`` appended), ``--removed`` rows deleted
and ``--added`` new products (ids ``n...``) appended.

1. **Night 1's predictions** for all ``--rows`` products: when ``--full-rows`` < ``--rows``, the CLI tags the
   catalog's distinct titles once, and that file is expanded to every product by title (a prediction is a function
   of the content alone, and the content hash is one of the title; the file's metadata is the CLI's). Otherwise the
   CLI tags night 1 itself.
2. **Full run**, ``--repeats`` times, alternating with night 2 (the load of a shared machine drifts; each pair sees
   about the same): the real CLI (``python -m xmctag tag ... -q``, a child process: start-up and model load
   included, peak RSS from ``os.wait4``) on the first ``--full-rows`` rows of night 1. When that is fewer than
   ``--rows``, the full run of ``--rows`` is extrapolated as: measured wall time + (rows - full_rows) / the
   tagging-loop rate the CLI reported (the loop streams, so its rate does not depend on the catalog's length).
3. **Night 2**: the CLI with ``--previous`` night 1's file, wall time, peak RSS and the counts of its
   ``--summary-json``, checked against what the catalogs imply. Then **night 3**: the same catalog again with
   ``--previous`` night 2's output (nothing to tag: the fixed cost of reading, hashing, joining and writing).
4. **Evidence**: ``Tagger.tag_file`` on the first ``--evidence-rows`` products with ``evidence=0`` and
   ``evidence=5`` (best of 2 each, in one process), products/s of the tagging loop.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
from common import markdown_table, print_header
from throughput import cli_products_per_second, run_with_peak_rss

ROW_GROUP = 100_000


def write_nights(titles_file: Path, work: Path, rows: int, changed: float, added: int, removed: int,
                 seed: int = 0) -> tuple[Path, Path, dict]:
    """Night 1 and night 2 catalogs (see the module docstring) and the counts night 2 should report."""
    titles = pl.read_parquet(titles_file, columns=["title"])["title"].drop_nulls()
    titles = titles.filter(titles.str.strip_chars().str.len_chars() > 0)
    night1 = pl.DataFrame({"id": [f"m{i:07d}" for i in range(rows)],
                           "title": titles.gather(np.arange(rows) % len(titles))})
    rng = np.random.default_rng(seed)
    n_changed = round(changed * rows)
    picked = rng.choice(rows, n_changed + removed, replace=False)
    change, remove = np.sort(picked[:n_changed]), np.sort(picked[n_changed:])
    flag = np.zeros(rows, dtype=np.int8)
    flag[change], flag[remove] = 1, 2
    night2 = (night1.with_columns(flag=pl.Series(flag))
              .with_columns(title=pl.when(pl.col("flag") == 1).then(pl.col("title") + " (new season)")
                            .otherwise(pl.col("title")))
              .filter(pl.col("flag") != 2).drop("flag"))
    extra = pl.DataFrame({"id": [f"n{i:07d}" for i in range(added)],
                          "title": titles.gather((np.arange(added) * 7 + 3) % len(titles))})
    night2 = pl.concat([night2, extra])
    paths = work / f"night1-{rows}.parquet", work / f"night2-{rows}.parquet"
    night1.write_parquet(paths[0], row_group_size=ROW_GROUP)
    night2.write_parquet(paths[1], row_group_size=ROW_GROUP)
    expected = {"reused": rows - n_changed - removed, "retagged": n_changed, "new": added, "dropped": removed}
    return paths[0], paths[1], expected


def tag_cli(catalog: Path, output: Path, bundle: Path, log: Path, *extra: str) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (MiB) and the reported loop rate of ``xmctag tag`` in a child process."""
    cmd = [sys.executable, "-m", "xmctag", "tag", str(catalog), "--model", str(bundle), "-o", str(output), "-q",
           *extra]
    code, seconds, peak = run_with_peak_rss(cmd, log)
    if code != 0:
        sys.exit(f"{' '.join(cmd)} failed ({code}); see {log}:\n{log.read_text()[-2000:]}")
    return seconds, peak, cli_products_per_second(log)


def expand_by_title(distinct_predictions: Path, distinct: pl.DataFrame, catalog: pl.DataFrame, out: Path) -> None:
    """Night 1's predictions for every product of ``catalog`` from those of its distinct titles (step 2)."""
    table = pq.read_table(distinct_predictions)
    by_title = pl.from_arrow(table).with_columns(title=distinct["title"]).drop("id")
    expanded = catalog.join(by_title, on="title", how="left", maintain_order="left").drop("title")
    arrow = expanded.to_arrow().cast(table.schema.remove_metadata()).replace_schema_metadata(table.schema.metadata)
    pq.write_table(arrow, out, compression="zstd", row_group_size=ROW_GROUP)


def evidence_cost(bundle: Path, catalog: Path, work: Path, rows: int) -> list[list[str]]:
    from xmctag import Tagger

    subset = work / f"evidence-{rows}.parquet"
    pl.read_parquet(catalog, n_rows=rows).write_parquet(subset)
    tagger = Tagger.load(bundle, device="cpu")
    tagger.tag_file(subset, work / "warm.parquet", progress=False, batch_size=1024)
    rates = {}
    for n in (0, 5, 0, 5):
        summary = tagger.tag_file(subset, work / f"evidence-{n}.parquet", progress=False, evidence=n)
        rates[n] = max(rates.get(n, 0.0), summary.products_per_second)
    return [[f"--evidence {n}" if n else "off (default)", f"{rates[n]:,.0f}", f"{100 * rates[n] / rates[0]:.0f}%"]
            for n in (0, 5)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--titles", type=Path, default=Path("/work/shared/data/myntra/train.parquet"))
    parser.add_argument("--work", type=Path, required=True, help="Where catalogs and predictions go (not the repo).")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--changed", type=float, default=0.02)
    parser.add_argument("--added", type=int, default=1000)
    parser.add_argument("--removed", type=int, default=1000)
    parser.add_argument("--full-rows", type=int, default=50_000, help="Rows of the measured full run.")
    parser.add_argument("--evidence-rows", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=2, help="Full run / night 2 pairs, alternating.")
    parser.add_argument("--skip-evidence", action="store_true")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    print_header("xmctag tag --previous: an incremental night against a full run")
    print(f"- bundle: {args.bundle}; catalog: {args.rows:,} products (Myntra titles, unique ids); night 2: "
          f"{args.changed:.0%} changed, {args.removed:,} removed, {args.added:,} added")
    night1, night2, expected = write_nights(args.titles, args.work, args.rows, args.changed, args.added,
                                            args.removed)
    full_catalog = night1
    if args.full_rows < args.rows:
        full_catalog = args.work / f"night1-first-{args.full_rows}.parquet"
        pl.read_parquet(night1, n_rows=args.full_rows).write_parquet(full_catalog)
        catalog = pl.read_parquet(night1)
        distinct = catalog.select("title").unique(maintain_order=True).with_row_index("n").select(
            pl.format("t{}", "n").alias("id"), "title")
        distinct_path = args.work / "distinct-titles.parquet"
        distinct.write_parquet(distinct_path)
        started = time.perf_counter()
        d_seconds, _, _ = tag_cli(distinct_path, args.work / "distinct.parquet", args.bundle,
                                  args.work / "distinct.log")
        night1_out = args.work / "night1.parquet"
        expand_by_title(args.work / "distinct.parquet", distinct, catalog, night1_out)
        print(f"- night 1's predictions: {len(distinct):,} distinct titles tagged in {d_seconds:,.1f} s, expanded "
              f"to {args.rows:,} products in {time.perf_counter() - started - d_seconds:,.1f} s")
    else:
        night1_out = args.work / "night1.parquet"
        tag_cli(night1, night1_out, args.bundle, args.work / "night1.log")
    # The full run and night 2 alternate (--repeats times): the machine's load drifts, and pairs see similar load.
    rows, pairs = [], []
    for repeat in range(1, args.repeats + 1):
        seconds, peak, rate = tag_cli(full_catalog, args.work / "full.parquet", args.bundle, args.work / "full.log")
        rows.append([f"{repeat}: full run, {args.full_rows:,} rows (measured)", f"{seconds:,.1f}", rate,
                     f"{peak:,.0f}"])
        full_seconds = seconds
        if args.full_rows < args.rows:
            full_seconds = seconds + (args.rows - args.full_rows) / float(rate.replace(",", ""))
            rows.append([f"{repeat}: full run, {args.rows:,} rows (extrapolated)", f"{full_seconds:,.1f}", rate, ""])
        summary = args.work / "night2.summary.json"
        seconds, peak, rate = tag_cli(night2, args.work / "night2.parquet", args.bundle, args.work / "night2.log",
                                      "--previous", str(night1_out), "--summary-json", str(summary))
        counts = json.loads(summary.read_text())["rows"]["incremental"]
        got = {key: counts[key] for key in expected}
        rows.append([f"{repeat}: night 2 with --previous, {args.rows - args.removed + args.added:,} rows",
                     f"{seconds:,.1f}", rate, f"{peak:,.0f}"])
        pairs.append((full_seconds, seconds))
    seconds, peak, rate = tag_cli(night2, args.work / "night3.parquet", args.bundle, args.work / "night3.log",
                                  "--previous", str(args.work / "night2.parquet"))
    rows.append(["night 3: night 2's catalog again, nothing changed", f"{seconds:,.1f}", rate, f"{peak:,.0f}"])
    print()
    print(markdown_table(["run", "wall s (start-up included)", "products/s (tagging loop)", "peak RSS MiB"], rows))
    print()
    best = min(full for full, _ in pairs) / min(night for _, night in pairs)
    print(f"- speed-up of night 2, end to end: {', '.join(f'{f / n:.1f}x' for f, n in pairs)} (pairs); best full "
          f"/ best night 2: **{best:.1f}x**; night 2 counts {got} "
          f"({'as expected' if got == expected else f'EXPECTED {expected}'})")
    written = pl.scan_parquet(args.work / "night2.parquet").select(pl.len()).collect().item()
    print(f"- night 2 wrote {written:,} products (catalog: {args.rows - args.removed + args.added:,})")
    if not args.skip_evidence:
        print()
        print(f"`--evidence` cost: `Tagger.tag_file` on {args.evidence_rows:,} products, best of 2, tagging loop")
        print()
        print(markdown_table(["evidence", "products/s", "vs off"], evidence_cost(args.bundle, night1, args.work,
                                                                                 args.evidence_rows)))
    return 0 if got == expected else 1


if __name__ == "__main__":
    sys.exit(main())
