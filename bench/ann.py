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
time per product (``label_vector_candidates(5)`` candidates) and the end-to-end ``tag_file`` products/s. recall@5:
the share of each product's top 5 under the exact bundle that the IVF bundle's top 5 holds, on the tagged catalog.
``ivf`` is ``export --index auto --exact-below 5000``: the labels by IVF, the 2,000 training products (neighbour
votes) exact.
    python bench/ann.py --run /tmp/ann/run --work /tmp/ann/work --sizes 10000,100000,1000000
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
    summary = tagger.tag_file(catalog, output, top_k=5, progress=False)
    return {"load_s": load, "encode_ms": 1e3 * encode / len(titles), "search_ms": 1e3 * search / len(titles),
            "products_per_s": summary.rows_tagged / summary.seconds, "tagged": summary.rows_tagged,
            "peak_rss_mb": peak_rss_mb()}


def run_step(*args: str) -> dict:
    result = subprocess.run([sys.executable, __file__, "--step", *args], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"step {args} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def recall_at_5(approx: Path, exact: Path) -> float:
    import polars as pl

    a, e = pl.read_parquet(approx), pl.read_parquet(exact)
    assert a["id"].to_list() == e["id"].to_list()
    hits = sum(len(set(x) & set(y)) for x, y in zip(a["labels"].to_list(), e["labels"].to_list()))
    return hits / max(1, sum(len(y) for y in e["labels"].to_list()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--step", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--run", type=Path)
    parser.add_argument("--work", type=Path)
    parser.add_argument("--catalog", type=Path, default=Path("catalogs/myntra-sample/dev.parquet"),
                        help="products to tag (repeated 5 times): not the training rows export measures recall on")
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--kinds", default="exact,ivf")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic runs and bundles")
    parser.add_argument("--json", type=Path, help="append each result as a JSON line here")
    args = parser.parse_args()
    if args.step:
        name, *rest = args.step
        print(json.dumps({"export": step_export, "tag": step_tag}[name](*rest)))
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
