"""Helpers shared by the benchmark scripts: the machine/date header, markdown tables, --set overrides.

The scripts import it as a plain module (``from common import ...``): ``python bench/NAME.py`` puts the script's own
folder, bench/, first on the module search path, so no path edits are needed. bench/ is not a package.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def physical_cores() -> int | None:
    """Distinct (physical id, core id) pairs of /proc/cpuinfo; None where it does not say."""
    try:
        blocks = Path("/proc/cpuinfo").read_text().split("\n\n")
    except OSError:
        return None
    cores = set()
    for block in blocks:
        fields = dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        if "core id" in fields:
            cores.add((fields.get("physical id"), fields["core id"]))
    return len(cores) or None


def ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def print_header(title: str) -> None:
    physical = physical_cores()
    cores = f"{os.cpu_count()} logical cores" + (f" ({physical} physical)" if physical else "")
    ram = ram_gib()
    print(f"## {title}")
    print()
    print(f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"- machine: {cpu_model()}, {cores}, {f'{ram:.1f} GiB RAM' if ram else 'RAM unknown'}")
    print(f"- python {platform.python_version()} on {platform.platform()}")
    print()


def write_title_subsets(dataset: Path, work: Path, train_rows: int, dev_rows: int, seed: int) -> tuple[Path, Path, int]:
    """``id``/``title``/``labels`` of ``train_rows`` training rows sampled with ``seed`` (0: all) and of the first
    ``dev_rows`` dev rows (0: all), written under ``work``; returns (train path, dev path, training rows taken).
    pyarrow only, so that it also runs on the GPU machine."""
    import numpy as np
    import pyarrow.parquet as pq

    work.mkdir(parents=True, exist_ok=True)
    columns = ["id", "title", "labels"]
    train_all = pq.read_table(dataset / "train.parquet", columns=columns)
    n_rows = min(train_rows, train_all.num_rows) if train_rows else train_all.num_rows
    taken = np.sort(np.random.default_rng(seed).choice(train_all.num_rows, n_rows, replace=False))
    train_path = work / f"train.{n_rows}.seed{seed}.parquet"
    pq.write_table(train_all.take(taken), train_path)
    dev = pq.read_table(dataset / "dev.parquet", columns=columns)
    dev_path = work / f"dev.{dev_rows or 'all'}.parquet"
    pq.write_table(dev.slice(0, dev_rows) if dev_rows else dev, dev_path)
    return train_path, dev_path, n_rows


def markdown_table(header: list[str], rows: list[list[str]], right_align_from: int = 1) -> str:
    align = ["---" if i < right_align_from else "---:" for i in range(len(header))]
    lines = [header, align, *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def parse_overrides(pairs: list[str]) -> dict:
    """``epochs=3 lr=1e-4`` -> Config keyword overrides, values parsed as JSON where possible."""
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out
