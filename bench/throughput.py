"""CPU throughput and memory benchmarks of xmctag tagging. A benchmark script, not a test.

Four subcommands; each prints the machine (CPU model, cores, RAM) and the date first, then a markdown table, so
the output can be pasted into bench/RESULTS.md as is.

1. ``speed``: products/s of ONNX Runtime vs PyTorch eager on the CPU, same model. Needs the run directory written
   by ``xmctag train`` (PyTorch weights) and the bundle ``xmctag export`` made from it::

       python bench/throughput.py speed --run runs/NAME --bundle export/NAME --catalog catalog.parquet \\
           [--rows 2000] [--text-col title] [--threads N]

   Both paths do the same work on the first ``--rows`` product texts of the catalog: tokenize, encode in
   length-sorted batches of 64, then the same search and scoring (faiss label-vector and neighbour searches,
   blend). Each is warmed up once on 64 rows and timed over all rows (best of 2). The two paths must agree on the
   top-5 labels of >= 99% of rows (exit code 1 if not).

2. ``memory``: peak RSS of the real ``xmctag tag`` CLI on synthetic catalogs of each size (it streams the
   catalog, so the peak should not grow with the row count)::

       python bench/throughput.py memory --bundle BUNDLE_DIR [--sizes 1000000,5000000] [--work bench/work]

   Catalogs (``id``, ``title`` of 4-12 random words) are written in row groups of 100k rows and cached under
   ``--work``, so reruns reuse them. Each size is tagged by ``python -m xmctag.cli tag ... --quiet`` in its own
   child process; its peak RSS is that child's ``ru_maxrss`` as returned by ``os.wait4`` (per child, unlike
   ``RUSAGE_CHILDREN``, which is a max over every child so far). Seconds are wall time of the whole command
   (start-up and model load included). The output row count is checked against the catalog.

3. ``fusion``: products/s of ``Tagger.predict`` on one bundle with its lexical model (the fused ranking, what
   ``tag`` runs) and without it (``tagger.lexical = None``: the dense ranking alone), on the first ``--rows``
   product texts, best of 2 after a warm-up; also the lexical model's own products/s (features + trees, one
   thread)::

       python bench/throughput.py fusion --bundle BUNDLE --catalog catalog.parquet [--rows 2000]

4. ``tiny-bundle``: a tiny random-weight model bundle in about a minute, for ``memory`` (which is about
   streaming, not model size: a real MiniLM would take hours on 5M rows with 2 cores)::

       python bench/throughput.py tiny-bundle --out /tmp/tiny-bundle [--keep-run /tmp/tiny-run]

   A random 2-layer, 32-wide BERT with the real MiniLM tokenizer, trained for one epoch on 300 synthetic rows
   with 20 labels, then exported. ``--keep-run`` also keeps the run directory (what ``speed --run`` needs).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
from common import markdown_table, print_header

# Product-like words for synthetic titles (fixed, so catalogs are reproducible).
VOCAB = """
red blue green black white yellow pink grey navy beige brown olive maroon purple orange teal cream khaki silver
gold charcoal ivory coral mint mustard rust lavender turquoise burgundy peach
cotton linen denim leather suede wool silk polyester nylon canvas velvet fleece jersey satin corduroy cashmere
viscose rayon mesh knit twill chiffon tweed rubber steel plastic bamboo ceramic glass oak walnut
shirt jeans shoes watch bag dress jacket socks cap belt sneakers boots sandals scarf gloves hoodie sweater
trousers shorts skirt blazer coat vest kurta saree leggings tshirt polo cardigan jumpsuit pyjamas bra briefs
wallet backpack handbag sunglasses bracelet necklace earrings ring pendant anklet tie bowtie umbrella mug bottle
lamp cushion blanket towel curtain rug pillow mattress chair table shelf desk sofa stool mirror clock vase
kettle toaster blender pan pot knife spoon plate bowl jar basket
men women boys girls kids unisex baby adult teen
slim regular relaxed loose skinny straight tapered cropped oversized fitted
casual formal party sports ethnic festive office outdoor travel everyday
printed striped checked solid floral graphic embroidered textured washed distressed quilted pleated ribbed
round neck collar hooded sleeveless short long sleeve button zip pocket lace drawstring elastic
small medium large extra pack set pair combo single double
premium classic vintage modern essential basic signature original deluxe limited
waterproof lightweight breathable stretch wrinkle resistant quick dry thermal padded insulated
acme zeta nova orbit lumen vertex aurora nimbus cobalt ember fable harbor juniper kestrel lotus meridian
onyx pioneer quartz raven sable tundra umber willow yonder zephyr atlas bolt crest drift
summer winter spring autumn monsoon holiday weekend
new best gift sale edition collection series style design fashion comfort
""".split()
MIN_WORDS, MAX_WORDS = 4, 12
ROW_GROUP = 100_000
TOP_K = 5
WARMUP_ROWS = 64
REPEATS = 2
TORCH_BATCH_SIZE = 64
MIN_AGREEMENT = 0.99


# ---------------------------------------------------------------------------------------------------------------
# Synthetic data
# ---------------------------------------------------------------------------------------------------------------
def random_titles(rng: np.random.Generator, n: int) -> pl.Series:
    """``n`` titles of MIN_WORDS..MAX_WORDS words drawn from VOCAB, built without a Python loop per row."""
    import pyarrow as pa

    lengths = rng.integers(MIN_WORDS, MAX_WORDS + 1, size=n)
    words = pl.Series(VOCAB).gather(rng.integers(0, len(VOCAB), size=int(lengths.sum())))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    lists = pa.LargeListArray.from_arrays(pa.array(offsets), words.to_arrow())
    return pl.Series("title", lists).list.join(" ")


def catalog_chunk(rng: np.random.Generator, start: int, n: int) -> pl.DataFrame:
    ids = pl.Series("id", np.arange(start, start + n)).cast(pl.String)
    return pl.DataFrame([("p" + ids).alias("id"), random_titles(rng, n)])


def write_catalog(path: Path, rows: int, seed: int = 0) -> None:
    """A Parquet catalog (``id``, ``title``) written one row group at a time; renamed into place when complete."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    schema = pa.schema([("id", pa.string()), ("title", pa.string())])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        for start in range(0, rows, ROW_GROUP):
            chunk = catalog_chunk(rng, start, min(ROW_GROUP, rows - start))
            writer.write_table(chunk.to_arrow().cast(schema), row_group_size=ROW_GROUP)
    tmp.rename(path)


def parquet_rows(path: Path) -> int:
    return pl.scan_parquet(path).select(pl.len()).collect().item()


def cached_catalog(work: Path, rows: int) -> Path:
    """``work/catalog-ROWS.parquet``, generated unless a complete one is already there."""
    path = work / f"catalog-{rows}.parquet"
    if path.is_file() and parquet_rows(path) == rows:
        print(f"reusing {path}", file=sys.stderr)
        return path
    started = time.perf_counter()
    write_catalog(path, rows)
    print(f"wrote {path} ({rows:,} rows) in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    return path


# ---------------------------------------------------------------------------------------------------------------
# speed: ONNX Runtime vs PyTorch eager
# ---------------------------------------------------------------------------------------------------------------
def best_time(fn, repeats: int = REPEATS) -> tuple[float, object]:
    """Best wall time of ``repeats`` calls of ``fn()`` and the result of the last call."""
    best, result = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - started)
    return best, result


def read_texts(catalog: Path, text_cols: list[str], rows: int) -> list[str]:
    """The first ``rows`` non-empty product texts (rows without text are skipped, as ``xmctag tag`` does)."""
    from xmctag.io.datasets import product_text_expr

    texts = (pl.scan_parquet(catalog).select(product_text_expr(text_cols).alias("text"))
             .drop_nulls().head(rows).collect()["text"].to_list())
    if not texts:
        sys.exit(f"{catalog}: no product text in column(s) {', '.join(text_cols)}")
    return texts


def torch_predict(encoder, tokenizer, tagger, texts: list[str], max_length: int, k: int) -> np.ndarray:
    """The PyTorch twin of ``Tagger.predict``: tokenize, encode in length-sorted batches with PyTorch, then the
    tagger's own search and scoring (faiss label and neighbour searches, blend)."""
    return tagger.rank(torch_embed(encoder, tokenizer, texts, max_length), k)[0]


def torch_embed(encoder, tokenizer, texts: list[str], max_length: int) -> np.ndarray:
    """Tokenize and encode ``texts`` with PyTorch in length-sorted batches (no search)."""
    import torch

    from xmctag.models.embedding import encode_texts

    with torch.inference_mode():
        return encode_texts(encoder, tokenizer, texts, max_length, batch_size=TORCH_BATCH_SIZE)


def encoder_flops(config, tagger, texts: list[str]) -> float:
    """Multiply-add FLOPs of a BERT-style encoder over ``texts`` as ``Tagger.embed`` batches them (length-sorted,
    padded to each batch's longest): per token and layer, Q/K/V/output projections 4h^2, feed-forward 2hI, and
    attention scores and weighted values 2hT for a batch padded to T tokens; x2 for multiply and add."""
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    lengths = np.sort([len(e.ids) for e in tagger.tokenizer.encode_batch(texts)])
    total = 0.0
    for start in range(0, len(lengths), tagger.encode_batch_size):
        batch = lengths[start:start + tagger.encode_batch_size]
        t = int(batch.max())
        total += 2.0 * layers * len(batch) * t * (4 * h * h + 2 * h * inter + 2 * h * t)
    return total


def matmul_gflops(config, threads: int) -> float:
    """This machine's fp32 matrix-product rate on the encoder's feed-forward shape (64 products x 16 tokens)."""
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(64 * 16, config.hidden_size)
    b = torch.randn(config.hidden_size, config.intermediate_size)
    c = torch.randn(config.intermediate_size, config.hidden_size)
    seconds = best_time(lambda: [torch.mm(torch.mm(a, b), c) for _ in range(20)], repeats=5)[0]
    return 20 * 2 * 2 * a.shape[0] * config.hidden_size * config.intermediate_size / seconds / 1e9


def top_k_agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Share of rows with the same top-k labels in the same order, and as a set."""
    ordered = float(np.mean(np.all(a == b, axis=1)))
    as_set = float(np.mean(np.all(np.sort(a, axis=1) == np.sort(b, axis=1), axis=1)))
    return ordered, as_set


def speed(args: argparse.Namespace) -> int:
    print_header("xmctag CPU tagging throughput: ONNX Runtime vs PyTorch eager")
    import faiss
    import onnxruntime
    import torch

    from xmctag import Tagger
    from xmctag.run_dir import load_run

    threads = args.threads or os.cpu_count()
    torch.set_num_threads(threads)
    trained = load_run(args.run)
    encoder, tokenizer = trained.encoder_and_tokenizer()
    encoder.eval()
    tagger = Tagger.load(args.bundle, device="cpu", threads=threads)
    source = Path(tagger.manifest.get("source_run", ""))
    if source.resolve() != Path(args.run).resolve():
        print(f"warning: the bundle was exported from {source}, not from {args.run}\n", file=sys.stderr)
    config = trained.config
    text_cols = args.text_col.split(",") if args.text_col else config.text_cols
    texts = read_texts(args.catalog, text_cols, args.rows)
    k = min(TOP_K, tagger.index.ntotal)

    def run_ort(rows):
        return tagger.predict(rows, top_k=k)[0]

    int8 = Tagger.load(args.bundle, device="cpu", threads=threads, precision="int8") \
        if "encoder.int8.onnx" in tagger.manifest["graph"]["files"] else None

    def run_torch(rows):
        return torch_predict(encoder, tokenizer, tagger, rows, config.max_length, k)

    run_ort(texts[:WARMUP_ROWS])
    run_torch(texts[:WARMUP_ROWS])
    ort_seconds, ort_top = best_time(lambda: run_ort(texts))
    torch_seconds, torch_top = best_time(lambda: run_torch(texts))
    ordered, as_set = top_k_agreement(ort_top, torch_top)
    if int8 is not None:
        int8.predict(texts[:WARMUP_ROWS], top_k=k)
        int8_seconds, int8_top = best_time(lambda: int8.predict(texts, top_k=k)[0])
        int8_ordered, int8_set = top_k_agreement(int8_top, torch_top)

    # Encoders alone (no search), and what they achieve in arithmetic: is a 1.8x speed-up still possible at fp32?
    encoder_seconds = {"ort": best_time(lambda: tagger.embed(texts))[0],
                       "torch": best_time(lambda: torch_embed(encoder, tokenizer, texts, config.max_length))[0]}
    flops = encoder_flops(encoder.config, tagger, texts)
    ceiling = matmul_gflops(encoder.config, threads)

    hidden = encoder.config.hidden_size
    layers = encoder.config.num_hidden_layers
    print(f"- model: {config.encoder} ({layers} layers, hidden {hidden}), max_length {config.max_length}, "
          f"{tagger.index.ntotal} labels, bundle {tagger.bundle_id}")
    print(f"- data: first {len(texts):,} product texts of {args.catalog} (columns {', '.join(text_cols)}); "
          f"top-{k}; warm-up on {WARMUP_ROWS} rows, then best of {REPEATS} runs over all rows")
    print(f"- threads: ONNX Runtime intra-op {threads}; torch intra-op {torch.get_num_threads()}, "
          f"inter-op {torch.get_num_interop_threads()}; faiss (OpenMP) {faiss.omp_get_max_threads()}")
    print(f"- batches: ONNX Runtime {tagger.encode_batch_size}, PyTorch {TORCH_BATCH_SIZE} (both length-sorted)")
    print(f"- versions: onnxruntime {onnxruntime.__version__}, torch {torch.__version__}, faiss {faiss.__version__}")
    print(f"- top-{k} agreement: {100 * as_set:.2f}% of rows same label set, {100 * ordered:.2f}% same order")
    if int8 is not None:
        print(f"- int8 graph vs PyTorch fp32: {100 * int8_set:.2f}% of rows same top-{k} label set, "
              f"{100 * int8_ordered:.2f}% same order")
    print()
    rows = [
        ["ONNX Runtime (fp32, CPU)", f"{len(texts) / ort_seconds:,.0f}", f"{torch_seconds / ort_seconds:.2f}x"],
        ["PyTorch eager (fp32, CPU)", f"{len(texts) / torch_seconds:,.0f}", "1.00x"],
    ]
    if int8 is not None:
        rows.insert(1, ["ONNX Runtime (int8 weights, CPU)", f"{len(texts) / int8_seconds:,.0f}",
                        f"{torch_seconds / int8_seconds:.2f}x"])
    print(markdown_table(["path", "products/s", "speed-up vs PyTorch"], rows))
    print(f"\nEncoders alone (tokenise + encode, no search), {flops / len(texts) / 1e6:,.0f} MFLOP per product "
          f"(matrix products of the padded length-sorted batches), against this machine's fp32 matrix-product rate "
          f"(torch.mm of the encoder's own shapes, {threads} threads, best of 5): {ceiling:,.0f} GFLOP/s\n")
    rows = []
    for name, key in (("ONNX Runtime (fp32)", "ort"), ("PyTorch eager (fp32)", "torch")):
        rate = flops / encoder_seconds[key] / 1e9
        rows.append([name, f"{len(texts) / encoder_seconds[key]:,.0f}", f"{rate:,.0f}", f"{100 * rate / ceiling:.0f}%"])
    needed = 1.8 * flops / encoder_seconds["torch"] / 1e9
    rows.append(["1.8x PyTorch would need", f"{1.8 * len(texts) / encoder_seconds['torch']:,.0f}", f"{needed:,.0f}",
                 f"{100 * needed / ceiling:.0f}%"])
    print(markdown_table(["encoder", "products/s", "GFLOP/s", "of the matmul rate"], rows))
    if as_set < MIN_AGREEMENT:
        print(f"\nFAILED: the two paths agree on only {100 * as_set:.2f}% of rows (need "
              f"{100 * MIN_AGREEMENT:.0f}%)", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------------------------------------------
# memory: peak RSS of `xmctag tag`
# ---------------------------------------------------------------------------------------------------------------
def fusion(args: argparse.Namespace) -> int:
    from xmctag import Tagger

    tagger = Tagger.load(args.bundle, device="cpu")
    if tagger.lexical is None:
        sys.exit(f"{args.bundle}: no lexical model (trained with lexical = \"none\")")
    texts = read_texts(args.catalog, list(tagger.config.text_cols), args.rows)
    lexical = tagger.lexical
    tagger.predict(texts[:WARMUP_ROWS])
    fused, _ = best_time(lambda: tagger.predict(texts, TOP_K))
    lexical_only, _ = best_time(lambda: lexical.predict(texts))
    tagger.lexical = None
    tagger.predict(texts[:WARMUP_ROWS])
    dense, _ = best_time(lambda: tagger.predict(texts, TOP_K))
    print_header(f"tagging throughput with and without the lexical model ({args.bundle})")
    print(f"- {len(texts)} products of {args.catalog}, top-{TOP_K}, best of {REPEATS}")
    rows = [["dense ranking (label vectors + neighbour votes)", f"{len(texts) / dense:,.0f}", "100%"],
            ["fused ranking (dense + lexical, what tag runs)", f"{len(texts) / fused:,.0f}",
             f"{100 * dense / fused:.0f}%"],
            ["lexical model alone (features + trees, one thread)", f"{len(texts) / lexical_only:,.0f}", ""]]
    print(markdown_table(["path", "products/s", "vs dense"], rows))
    return 0


def run_with_peak_rss(cmd: list[str], log: Path) -> tuple[int, float, float]:
    """Runs ``cmd`` (output to ``log``); returns exit code, wall seconds and the child's peak RSS in MiB."""
    with open(log, "wb") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # rusage of this child (and what it waited for) only
        seconds = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    peak_bytes = usage.ru_maxrss if sys.platform == "darwin" else usage.ru_maxrss * 1024  # Linux: KiB
    return proc.returncode, seconds, peak_bytes / 2**20


def cli_products_per_second(log: Path) -> str:
    """The tagging-loop rate ``xmctag tag`` reports on stderr (start-up and model load excluded), or "?"."""
    match = re.search(r"\(([\d,.]+) products/s", log.read_text(errors="replace"))
    return match.group(1) if match else "?"


def bundle_text_cols(bundle: Path) -> list[str]:
    config = json.loads((bundle / "config.json").read_text())
    return config.get("text_cols", ["title"])


def memory(args: argparse.Namespace) -> int:
    print_header("xmctag tag: peak memory on large catalogs")
    bundle = Path(args.bundle)
    if not (bundle / "manifest.json").is_file():
        sys.exit(f"--bundle {bundle}: not an xmctag bundle (no manifest.json)")
    if bundle_text_cols(bundle) != ["title"]:
        sys.exit(f"--bundle {bundle}: reads columns {bundle_text_cols(bundle)}; synthetic catalogs only have title")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    results, failed = [], False
    for rows in sizes:
        catalog = cached_catalog(work, rows)
        output = work / f"predictions-{rows}.parquet"
        log = work / f"tag-{rows}.log"
        cmd = [sys.executable, "-m", "xmctag.cli", "tag", str(catalog), "--model", str(bundle),
               "--top-k", str(TOP_K), "--output", str(output), "--quiet"]
        code, seconds, peak_mib = run_with_peak_rss(cmd, log)
        if code != 0:
            print(f"xmctag tag failed on {catalog} (exit {code}):\n{log.read_text()}", file=sys.stderr)
            failed = True
            continue
        written = parquet_rows(output)
        check = "ok" if written == rows else f"MISMATCH ({rows:,} expected)"
        failed |= written != rows
        results.append([f"{rows:,}", f"{seconds:.1f}", f"{rows / seconds:,.0f}", cli_products_per_second(log),
                        f"{peak_mib:,.0f}", f"{written:,} {check}"])
    print(f"- command: python -m xmctag.cli tag CATALOG --model {bundle} --top-k {TOP_K} --output OUT --quiet")
    print(f"- catalogs: synthetic (id, title of {MIN_WORDS}-{MAX_WORDS} words from {len(VOCAB)}), row groups of "
          f"{ROW_GROUP:,}, under {work}")
    print("- seconds, products/s: wall time of the whole command (start-up and model load included); tag loop: "
          "the rate `xmctag tag` reports for its tagging loop alone; peak RSS: the command's ru_maxrss (os.wait4)")
    print()
    print(markdown_table(["rows", "seconds", "products/s", "tag loop products/s", "peak RSS MiB", "output rows"],
                         results))
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------------------------
# tiny-bundle: a random-weight model, trained and exported in about a minute
# ---------------------------------------------------------------------------------------------------------------
def save_tiny_encoder(out: Path) -> None:
    """A 2-layer, 32-wide random BERT saved with the real MiniLM tokenizer (as tests/conftest.py does)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from xmctag.models.registry import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("builtin:minilm-l6"), local_files_only=True)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)


def write_tiny_training_data(directory: Path, rows: int = 300, n_labels: int = 20) -> tuple[Path, Path]:
    """``train.parquet`` (id, title, labels) and ``labels.parquet`` (label, text): each title names its labels."""
    rng = np.random.default_rng(0)
    label_words = VOCAB[:n_labels]
    picks = [rng.choice(n_labels, size=rng.integers(1, 3), replace=False) for _ in range(rows)]
    titles = random_titles(rng, rows).to_list()
    train = pl.DataFrame({
        "id": [f"t{i}" for i in range(rows)],
        "title": [" ".join(label_words[j] for j in pick) + " " + title for pick, title in zip(picks, titles)],
        "labels": [[f"word:{label_words[j]}" for j in pick] for pick in picks],
    }, schema={"id": pl.String, "title": pl.String, "labels": pl.List(pl.String)})
    labels = pl.DataFrame({"label": [f"word:{w}" for w in label_words], "text": [f"word: {w}" for w in label_words]})
    train.write_parquet(directory / "train.parquet")
    labels.write_parquet(directory / "labels.parquet")
    return directory / "train.parquet", directory / "labels.parquet"


def tiny_bundle(args: argparse.Namespace) -> int:
    print_header("tiny random-weight bundle for the memory benchmark")
    import xmctag

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="xmctag-tiny-") as tmp:
        tmp = Path(tmp)
        save_tiny_encoder(tmp / "encoder")
        train_path, labels_path = write_tiny_training_data(tmp)
        run = Path(args.keep_run) if args.keep_run else tmp / "run"
        config = xmctag.Config(encoder=str(tmp / "encoder"), epochs=1, batch_size=32, max_length=32,
                               label_vector_epochs=2)
        xmctag.train(train_path, labels_path, run, config=config, overwrite=args.overwrite, progress=False)
        xmctag.export(run, args.out, overwrite=args.overwrite, progress=False)
    print(f"- bundle: {args.out}" + (f" (run directory: {args.keep_run})" if args.keep_run else ""))
    print(f"- model: random BERT, 2 layers, hidden 32, MiniLM tokenizer; trained 1 epoch on 300 rows, 20 labels; "
          f"built in {time.perf_counter() - started:.0f}s")
    return 0


# ---------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("speed", help="ONNX Runtime vs PyTorch eager products/s on the CPU, same model")
    p.add_argument("--run", required=True, help="run directory written by `xmctag train`")
    p.add_argument("--bundle", required=True, help="bundle exported from that run by `xmctag export`")
    p.add_argument("--catalog", required=True, type=Path, help="Parquet catalog with the model's text columns")
    p.add_argument("--rows", type=int, default=2000, help="first N product texts to tag (default 2000)")
    p.add_argument("--text-col", default=None,
                   help="text column(s), comma-separated (default: the model's text columns)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for both paths (default: all cores)")
    p.set_defaults(func=speed)

    p = commands.add_parser("fusion", help="products/s with and without the lexical model, same bundle")
    p.add_argument("--bundle", required=True, help="bundle with a lexical model")
    p.add_argument("--catalog", required=True, type=Path, help="Parquet catalog with the model's text columns")
    p.add_argument("--rows", type=int, default=2000, help="first N product texts to tag (default 2000)")
    p.set_defaults(func=fusion)

    p = commands.add_parser("memory", help="peak RSS of `xmctag tag` on synthetic catalogs")
    p.add_argument("--bundle", required=True, help="bundle to tag with (e.g. from tiny-bundle)")
    p.add_argument("--sizes", default="1000000,5000000", help="catalog sizes in rows, comma-separated")
    p.add_argument("--work", default="bench/work", help="where catalogs (cached) and predictions go")
    p.set_defaults(func=memory)

    p = commands.add_parser("tiny-bundle", help="build a tiny random-weight bundle quickly")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--keep-run", default=None, help="also keep the run directory here (for `speed --run`)")
    p.add_argument("--overwrite", action="store_true", help="replace non-empty --out / --keep-run directories")
    p.set_defaults(func=tiny_bundle)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from xmctag.errors import UserError

    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # header and tables in order with stderr notes when piped
    try:
        return args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
