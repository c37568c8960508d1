"""Approximate indexes (issue 19): tagging throughput, recall@5 against exact search, export time, bundle size and
peak RSS, with L labels searched exactly or by IVF (``xmctag.backend.index``).

No trained run has a million labels, so they are synthesised from a small real run (``--run``, e.g. trained on
catalogs/myntra-sample with ``--epochs 0 --classifier-epochs 0 --lexical none --vision none``): its trained labels,
then random sparse mixtures of 3 of them (Dirichlet weights) plus Gaussian noise of 0.3x each dimension's spread, for
label vectors ``[w, b]`` and label-text embeddings alike, so the new rows lie where real ones do. The run's 2,000
training products and their labels stay: the neighbour search is exact at that size (``--index auto``).

For each size and kind (``exact``, ``ivf``), in subprocesses of this script (so each step's peak RSS is its own):
export (wall time, the manifest's ``index`` section, bundle size), then tagging ``--catalog`` (default the sample's
400 dev products, 5 times over: products export did not tune on) on 2 threads: load time, encoder time, label-search
time per product (``label_vector_candidates(5)`` candidates) and the end-to-end ``tag_file`` products/s (the best
of 2 runs). recall@5: the share of each product's top 5 under the exact bundle that the IVF bundle's top 5 holds,
on the tagged catalog. ``ivf`` is ``export --index auto --exact-below 5000``: the labels by IVF, the 2,000 training
products (neighbour votes) exact.

    python bench/ann.py --run /tmp/ann/run --work /tmp/ann/work --sizes 10000,100000,1000000
    python bench/ann.py --run /tmp/ann/run --sizes "" --neighbour-sizes 100000,500000
    python bench/ann.py --table FILE.jsonl     # the Markdown tables of RESULTS.md from --json FILE.jsonl

``--neighbour-sizes``: the neighbour search alone (``step_neighbours``) over that many synthetic training products
(mixtures of the run's 2,000, as for the labels): IVF build and tuning time, exact and IVF search time per product,
recall@20 on 2,000 held-out synthetic products.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CHUNK = 100_000
IVF_FROM = 5_000  # the "ivf" rows: export --index auto --exact-below 5000 (labels IVF, the 2,000 products exact)
TAG_RUNS = 2
REPEATS = 5  # the tagged catalog: the sample's 400 dev products, 5 times (other ids), 2,000 rows


def synthesise(run: Path, out: Path, n_labels: int, seed: int = 0) -> Path:
    """A copy of ``run`` with ``n_labels`` labels (module docstring), written in chunks."""
    import polars as pl

    from xmctag import run_dir

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(run, out)
    rng = np.random.default_rng(seed)
    for name in (run_dir.LABEL_VECTORS, run_dir.LABEL_EMBEDDINGS):
        base = np.load(run / name)
        spread = base.std(axis=0)
        target = np.lib.format.open_memmap(out / name, mode="w+", dtype=np.float32, shape=(n_labels, base.shape[1]))
        target[:len(base)] = base
        for start in range(len(base), n_labels, CHUNK):
            n = min(CHUNK, n_labels - start)
            chunk_rng = np.random.default_rng([seed, start])  # the same labels in both arrays, chunk by chunk
            picks, weights = chunk_rng.integers(0, len(base), (n, 3)), chunk_rng.dirichlet(np.ones(3), n)
            rows = np.einsum("nk,nkd->nd", weights, base[picks]) + 0.3 * spread * rng.standard_normal(
                (n, base.shape[1])).astype(np.float32)
            if name == run_dir.LABEL_EMBEDDINGS:
                rows /= np.linalg.norm(rows, axis=1, keepdims=True)
            target[start:start + n] = rows
        target.flush()
        del target
    table = pl.read_parquet(run / run_dir.LABELS)
    names = [f"synthetic:{i}" for i in range(n_labels - len(table))]
    added = pl.DataFrame({"label": names, "text": names, "encoder_text": names, "train_count": [0] * len(names)})
    pl.concat([table, added], how="diagonal_relaxed").select(table.columns).write_parquet(out / run_dir.LABELS)
    return out


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM: reset at exec, unlike getrusage's ru_maxrss, which a child
    inherits from the parent it was forked from)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def step_export(run: str, out: str, kind: str) -> dict:
    import warnings

    from xmctag import export

    lines = []
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # ivf: the labels (10,000 and more here) by IVF, the 2,000 training products exact, as auto would
        export(run, out, fp16=False, progress=False, **({"index": "exact"} if kind == "exact" else
                                                        {"index": "auto", "exact_below": IVF_FROM}))
    seconds = time.perf_counter() - started
    manifest = json.loads((Path(out) / "manifest.json").read_text())
    lines += [str(w.message) for w in caught if "index" in str(w.message)]
    size = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file())
    return {"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "bundle_mb": size / 2**20, "index": manifest["index"],
            "warnings": lines, "files": sorted(manifest["files"])}


def step_tag(bundle: str, catalog: str, output: str) -> dict:
    import polars as pl

    from xmctag import Tagger
    from xmctag.scoring import label_vector_candidates

    started = time.perf_counter()
    tagger = Tagger.load(bundle, device="cpu", threads=2)
    load = time.perf_counter() - started
    titles = pl.read_parquet(catalog)["title"].to_list()
    started = time.perf_counter()
    embeddings = tagger.embed(titles)
    encode = time.perf_counter() - started
    queries = np.hstack([embeddings, np.ones((len(embeddings), 1), np.float32)])
    tagger.index.search(queries[:64], label_vector_candidates(5))  # warm the memory map
    started = time.perf_counter()
    for s in range(0, len(queries), 64):  # tag_file's encoder batches are 64 products on the CPU
        tagger.index.search(queries[s:s + 64], label_vector_candidates(5))
    search = time.perf_counter() - started
    rates = []
    for _ in range(TAG_RUNS):  # the best of them: the 2 cores are shared, other jobs only ever slow a run down
        summary = tagger.tag_file(catalog, output, top_k=5, progress=False)
        rates.append(summary.rows_tagged / summary.seconds)
    return {"load_s": load, "encode_ms": 1e3 * encode / len(titles), "search_ms": 1e3 * search / len(titles),
            "products_per_s": max(rates), "runs": rates, "tagged": summary.rows_tagged, "peak_rss_mb": peak_rss_mb()}


def mixtures(base: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` unit-norm rows: random mixtures of 3 rows of ``base`` plus noise (as ``synthesise``'s labels)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, base.shape[1]), np.float32)
    spread = base.std(axis=0)
    for start in range(0, n, CHUNK):
        m = min(CHUNK, n - start)
        rows = np.einsum("nk,nkd->nd", rng.dirichlet(np.ones(3), m), base[rng.integers(0, len(base), (m, 3))])
        rows += 0.3 * spread * rng.standard_normal((m, base.shape[1]))
        out[start:start + m] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return out


def step_neighbours(run: str, n: str) -> dict:
    """The neighbour search alone over ``n`` synthetic training products (mixtures of the run's): IVF built and tuned
    as export does, then exact (IndexFlatIP, what tagging searches below the threshold) and IVF search times and
    recall@20 on 2,000 held-out synthetic products."""
    import faiss

    from xmctag import run_dir
    from xmctag.backend import index as searches

    base = np.load(Path(run) / run_dir.TRAIN_EMBEDDINGS)
    products, queries = mixtures(base, int(n), 1), mixtures(base, 2000, 2)
    started = time.perf_counter()
    index, entry = searches.neighbour_index(products, 20, requested="ivf", log=lambda line: None)
    build = time.perf_counter() - started
    flat = faiss.IndexFlatIP(products.shape[1])
    flat.add(products)
    timings = {}
    for name, search in (("exact", flat), ("ivf", index)):
        started = time.perf_counter()
        found = [search.search(queries[s:s + 64], 20)[1] for s in range(0, len(queries), 64)]
        timings[name] = (1e3 * (time.perf_counter() - started) / len(queries), np.vstack(found))
    return {"rows": int(n), "build_s": build, "entry": entry, "exact_ms": timings["exact"][0],
            "ivf_ms": timings["ivf"][0], "recall@20": searches.overlap(timings["ivf"][1], timings["exact"][1]),
            "peak_rss_mb": peak_rss_mb()}


def run_step(*args: str) -> dict:
    result = subprocess.run([sys.executable, __file__, "--step", *args], capture_output=True, text=True, check=False)
    if result.returncode:
        raise SystemExit(f"step {args} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def recall_at_5(approx: Path, exact: Path) -> float:
    import polars as pl

    a, e = pl.read_parquet(approx), pl.read_parquet(exact)
    assert a["id"].to_list() == e["id"].to_list()
    hits = sum(len(set(x) & set(y)) for x, y in zip(a["labels"].to_list(), e["labels"].to_list()))
    return hits / max(1, sum(len(y) for y in e["labels"].to_list()))


def print_tables(path: Path) -> None:
    """The Markdown of RESULTS.md's section from the JSON lines of ``--json``."""
    from common import markdown_table, print_header

    print_header("Approximate indexes — `bench/ann.py`")
    results = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for r in (r for r in results if "labels" in r):
        entry, tagged = r["export"]["index"]["labels"], r["tag"]
        shape = f"ivf {entry['nprobe']}/{entry['nlist']} {entry['storage']}" if entry["kind"] == "ivf" else "exact"
        recall = " / ".join(f"{v:.4f}" for v in entry["recall"].values()) if entry["recall"] else "-"
        rows.append([f"{r['labels']:,}", shape, f"{r['export']['seconds']:.0f}", f"{r['export']['bundle_mb']:,.0f}",
                     f"{r['export']['peak_rss_mb']:,.0f}", recall, f"{tagged['search_ms']:.2f}",
                     f"{tagged['encode_ms']:.2f}", f"{tagged['products_per_s']:.0f}",
                     f"{tagged['peak_rss_mb']:,.0f}", f"{tagged['load_s']:.1f}",
                     f"{r['recall@5']:.4f}" if "recall@5" in r else "-"])
    print(markdown_table(["labels", "label search", "export s", "bundle MB", "export peak RSS MB",
                          "export recall cand@32 / top@5", "search ms/product", "encoder ms/product",
                          "tag products/s", "tag peak RSS MB", "load s", "recall@5 vs exact"], rows, 2))
    rows = []
    for r in (r["neighbours"] for r in results if "neighbours" in r):
        e = r["entry"]
        rows.append([f"{r['rows']:,}", f"ivf {e['nprobe']}/{e['nlist']} {e['storage']}", f"{r['build_s']:.0f}",
                     f"{next(iter(e['recall'].values())):.4f}", f"{r['recall@20']:.4f}", f"{r['exact_ms']:.2f}",
                     f"{r['ivf_ms']:.2f}", f"{r['peak_rss_mb']:,.0f}"])
    if rows:
        print()
        print(markdown_table(["training products", "neighbour search", "build + tune s", "export recall@20",
                              "held-out recall@20", "exact ms/product", "ivf ms/product", "peak RSS MB"], rows, 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--step", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--run", type=Path)
    parser.add_argument("--work", type=Path)
    parser.add_argument("--catalog", type=Path, default=Path("catalogs/myntra-sample/dev.parquet"),
                        help="products to tag (repeated 5 times): not the training rows export measures recall on")
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--kinds", default="exact,ivf")
    parser.add_argument("--neighbour-sizes", default="", help="also time the neighbour search alone over this many "
                        "synthetic training products (e.g. 100000,500000)")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic runs and bundles")
    parser.add_argument("--json", type=Path, help="append each result as a JSON line here")
    parser.add_argument("--table", type=Path, help="print RESULTS.md's tables from such a JSON file, and stop")
    args = parser.parse_args()
    if args.table:
        print_tables(args.table)
        return
    if args.step:
        name, *rest = args.step
        print(json.dumps({"export": step_export, "tag": step_tag, "neighbours": step_neighbours}[name](*rest)))
        return
    for size in (int(s) for s in args.neighbour_sizes.split(",") if s):
        result = {"neighbours": run_step("neighbours", str(args.run), str(size))}
        print(json.dumps(result), flush=True)
        if args.json:
            with args.json.open("a") as file:
                file.write(json.dumps(result) + "\n")
    if not args.sizes:
        return
    args.work.mkdir(parents=True, exist_ok=True)
    import polars as pl

    products = pl.read_parquet(args.catalog)
    catalog = args.work / "catalog.parquet"
    pl.concat([products.with_columns(pl.col("id") + f"-{i}") for i in range(REPEATS)]).write_parquet(catalog)
    for size in (int(s) for s in args.sizes.split(",")):
        started = time.perf_counter()
        run = synthesise(args.run, args.work / f"run-{size}", size)
        print(f"# {size:,} labels synthesised in {time.perf_counter() - started:.0f} s", flush=True)
        outputs = {}
        for kind in args.kinds.split(","):
            bundle = args.work / f"bundle-{size}-{kind}"
            shutil.rmtree(bundle, ignore_errors=True)
            exported = run_step("export", str(run), str(bundle), kind)
            outputs[kind] = args.work / f"tags-{size}-{kind}.parquet"
            tagged = run_step("tag", str(bundle), str(catalog), str(outputs[kind]))
            result = {"labels": size, "kind": kind, "export": exported, "tag": tagged}
            if kind != "exact" and "exact" in outputs:
                result["recall@5"] = recall_at_5(outputs[kind], outputs["exact"])
            print(json.dumps(result), flush=True)
            if args.json:
                with args.json.open("a") as file:
                    file.write(json.dumps(result) + "\n")
            if not args.keep:
                shutil.rmtree(bundle)
        if not args.keep:
            shutil.rmtree(run)


if __name__ == "__main__":
    main()
