"""Training at 10^5-10^6 labels: peak memory and time of ``xmctag train`` with default settings, and the sizing of
larger runs on paper.

    python bench/synthetic_xmc.py write /tmp/syn131k            # ~295k products, ~131k labels (LF-AmazonTitles-131K)
    python bench/scale.py train /tmp/syn131k OUT_DIR [-- extra xmctag train arguments]
    python bench/scale.py size [--products 2200000] [--labels 1300000] [--dev 20000]

``train`` runs ``xmctag train --train DIR/train.parquet --labels DIR/labels.parquet --dev DIR/dev.parquet --out
OUT_DIR`` as a child process, samples the resident memory of it and its children every 0.5 s (psutil: the peak of
their sum), time-stamps every line it logs, and prints a markdown table: the peak, train's own estimate (the
"memory: estimated peak" line), the minutes to each stage's first log line, and the dev metrics of metrics.json
(label vectors, dense, lexical, fused).

``size`` prints train's memory estimate (``xmctag.training.memory``) for a run of the given size on a GPU
(``--device cuda``: the fine-tuning and label-vector terms on the GPU) and on the CPU, part by part.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import markdown_table, print_header

STAGES = {  # the first log line of each stage
    "read": "train:",
    "memory check": "memory: estimated peak",
    "lexical model": "lexical model:",
    "embeddings": "embedding labels and training products",
    "label vectors": "label vectors:",
    "final metrics": "label vectors: dev",
    "fusion weights": "fusion weights",
}


def sample_rss(pid: int, peak: list[float], stop: threading.Event) -> None:
    import psutil

    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    while not stop.is_set():
        try:
            total = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
            peak[0] = max(peak[0], total)
        except psutil.Error:
            pass
        stop.wait(0.5)


def train(args) -> int:
    data, out = args.data, args.out
    cmd = [sys.executable, "-m", "xmctag", "train", "--train", str(data / "train.parquet"), "--labels",
           str(data / "labels.parquet"), "--dev", str(data / "dev.parquet"), "--out", str(out), *args.extra]
    print_header("xmctag train at scale: " + " ".join(cmd[3:]))
    log = out.with_suffix(".log")
    peak, stop = [0.0], threading.Event()
    started = time.perf_counter()
    firsts: dict[str, float] = {}
    lines = []
    with open(log, "w") as written:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        sampler = threading.Thread(target=sample_rss, args=(proc.pid, peak, stop), daemon=True)
        sampler.start()
        for line in proc.stdout:
            minutes = (time.perf_counter() - started) / 60
            written.write(f"[{minutes:7.2f} min, {peak[0] / 2**30:5.1f} GiB] {line}")
            written.flush()
            lines.append(line.strip())
            for stage, prefix in STAGES.items():
                if stage not in firsts and line.strip().startswith(prefix):
                    firsts[stage] = minutes
        code = proc.wait()
    stop.set()
    total = (time.perf_counter() - started) / 60
    estimate = next((line for line in lines if line.startswith("memory: estimated peak")), "?")
    print(f"- exit code {code}; {total:.1f} min; peak RSS (process tree) **{peak[0] / 2**30:.2f} GiB**")
    print(f"- train's estimate: {estimate}")
    print(f"- log: {log}")
    print()
    print(markdown_table(["stage starts", "minute"], [[k, f"{v:.1f}"] for k, v in firsts.items()]))
    metrics_file = out / "metrics.json"
    if metrics_file.exists():
        final = json.loads(metrics_file.read_text())["history"][-1]
        rows = []
        for key, name in (("dev_label_vectors", "label vectors"), ("dev_dense", "label vectors + neighbours"),
                          ("dev_lexical", "lexical model"), ("dev", "fused (what tag reports)")):
            if key in final:
                m = final[key]
                rows.append([name, *(f"{100 * m[c]:.2f}" for c in ("P@1", "P@3", "P@5", "PSP@5"))])
        print()
        print(markdown_table(["dev ranking", "P@1", "P@3", "P@5", "PSP@5"], rows))
    return code


def size(args) -> int:
    from xmctag import Config
    from xmctag.training.memory import GiB, estimate_memory

    print_header(f"train's memory estimate: {args.products:,} products, {args.labels:,} labels, MiniLM-L6")
    rows = []
    for device in ("cuda", "cpu"):
        parts = estimate_memory(Config(), args.products, args.dev, args.labels, int(0.9 * args.labels),
                                args.products * args.chars, 384, 22_700_000, 6, 12, cuda=device == "cuda")
        for where, values in parts.items():
            for part, value in values.items():
                rows.append([device, where, part, f"{value / GiB:.2f}"])
            if values:
                rows.append([device, where, "**total**", f"**{sum(values.values()) / GiB:.2f}**"])
    print(markdown_table(["--device", "memory", "part", "GiB"], rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    t = commands.add_parser("train")
    t.add_argument("data", type=Path)
    t.add_argument("out", type=Path)
    t.add_argument("extra", nargs="*", help="more xmctag train arguments (after --)")
    s = commands.add_parser("size")
    s.add_argument("--products", type=int, default=2_200_000)
    s.add_argument("--labels", type=int, default=1_300_000)
    s.add_argument("--dev", type=int, default=20_000)
    s.add_argument("--chars", type=int, default=60, help="characters per product title")
    args = parser.parse_args(argv)
    return train(args) if args.command == "train" else size(args)


if __name__ == "__main__":
    sys.exit(main())
