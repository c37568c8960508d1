"""How long ``xmctag diff`` takes on large prediction files. A benchmark script, not a test.

    python bench/diff.py [--rows 1000000] [--labels 20000] [--top-k 5] [--work bench/work/diff]

Writes two synthetic nights of ``--rows`` products each with ``xmctag.io.writers.PredictionWriter`` (what ``tag``
writes; top-k labels drawn from ``--labels`` with a Zipf-like skew, float32 scores): tonight drops 2% of last night's
products, adds 2% new ones and re-tags 10% of the rest. Both nights are written as Parquet and as CSV (cached under
``--work``; reruns reuse them). Then times ``xmctag.diff`` on Parquet vs Parquet and Parquet vs CSV, and the HTML
rendering, each in its own child process (``python -c``), reporting wall seconds and the child's peak RSS
(``ru_maxrss`` from ``os.wait4``). Prints the machine and date, then a markdown table for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import markdown_table, print_header

CHILD = """
import sys, time
import xmctag
from xmctag.reports.html import render_html
started = time.perf_counter()
report = xmctag.diff(sys.argv[1], sys.argv[2])
seconds = time.perf_counter() - started
started = time.perf_counter()
page = render_html(report.to_dict())
print(seconds, time.perf_counter() - started, report.products.added, report.products.removed,
      report.products.retagged, len(page))
"""


def write_night(path: Path, ids: np.ndarray, labels: np.ndarray, scores: np.ndarray, fmt: str) -> None:
    from xmctag.io.writers import PredictionWriter

    meta = {"bundle_id": path.stem, "tagged_at": "2026-12-03T02:00:00+00:00", "top_k": str(labels.shape[1])}
    with PredictionWriter(path, fmt, meta) as writer:
        for start in range(0, len(ids), 100_000):
            rows = slice(start, start + 100_000)
            names = [[f"label{x}" for x in row] for row in labels[rows]]
            writer.write(ids[rows].tolist(), names, names, list(scores[rows]))


def make_nights(work: Path, rows: int, n_labels: int, top_k: int) -> dict[str, Path]:
    paths = {f"{night}.{fmt}": work / f"{night}-{rows}.{fmt}" for night in ("old", "new") for fmt in ("parquet", "csv")}
    if all(p.exists() for p in paths.values()):
        return paths
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        # distinct labels per product (a random offset walk), skewed towards low ids; scores sorted, best first
        first = np.minimum(rng.zipf(1.3, n) - 1, n_labels - 1)
        steps = rng.integers(1, n_labels // top_k, (n, top_k - 1))
        labels = (first[:, None] + np.concatenate([np.zeros((n, 1), int), np.cumsum(steps, 1)], 1)) % n_labels
        scores = -np.sort(-rng.random((n, top_k)).astype(np.float32), axis=1)
        return labels, scores

    ids = np.array([f"sku{i:08d}" for i in range(rows)], dtype=object)
    labels, scores = draw(rows)
    keep = rng.random(rows) >= 0.02
    new_ids = np.concatenate([ids[keep], np.array([f"new{i:08d}" for i in range(rows - int(keep.sum()))], object)])
    new_labels, new_scores = labels[keep].copy(), scores[keep].copy()
    changed = rng.random(len(new_labels)) < 0.10
    new_labels[changed], new_scores[changed] = draw(int(changed.sum()))
    extra_labels, extra_scores = draw(len(new_ids) - len(new_labels))
    new_labels, new_scores = np.concatenate([new_labels, extra_labels]), np.concatenate([new_scores, extra_scores])
    for fmt in ("parquet", "csv"):
        write_night(paths[f"old.{fmt}"], ids, labels, scores, fmt)
        write_night(paths[f"new.{fmt}"], new_ids, new_labels, new_scores, fmt)
    return paths


def run_child(old: Path, new: Path) -> tuple[float, list[str], float]:
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(old), str(new)], stdout=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"diff of {old} and {new} failed")
    return wall, child.stdout.read().split(), usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--labels", type=int, default=20_000)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--work", type=Path, default=Path("bench/work/diff"))
    args = parser.parse_args()
    started = time.perf_counter()
    paths = make_nights(args.work, args.rows, args.labels, args.top_k)
    written = time.perf_counter() - started
    print_header(f"xmctag diff on {args.rows:,} products, top-{args.top_k} of {args.labels:,} labels")
    print(f"Files: {', '.join(f'{k} {p.stat().st_size / 2**20:.0f} MiB' for k, p in paths.items())} "
          f"(written in {written:.0f} s, or cached).\n")
    rows = []
    for old, new in (("old.parquet", "new.parquet"), ("old.parquet", "new.csv"), ("old.csv", "new.csv")):
        wall, out, rss = run_child(paths[old], paths[new])
        diff_s, html_s, added, removed, retagged, page = out
        rows.append([f"{old} vs {new}", f"{float(diff_s):.1f}", f"{float(html_s):.2f}", f"{wall:.1f}",
                     f"{rss:,.0f}", f"{int(added):,} / {int(removed):,} / {int(retagged):,}",
                     f"{int(page) / 1024:.0f} KiB"])
    print(markdown_table(["files", "diff s", "HTML s", "process s", "peak RSS MiB", "added / removed / re-tagged",
                          "page"], rows))


if __name__ == "__main__":
    main()
