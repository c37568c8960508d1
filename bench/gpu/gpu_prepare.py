"""Builds the three git-ignored folders that bench/gpu/gpu_session.sh carries to the GPU machine (64 MiB or less each).

    python bench/gpu/gpu_prepare.py            # writes .gpu/a, .gpu/b, .gpu/c (replacing them)

- ``.gpu/a``: wheels of the libraries the training path needs at the versions installed here (transformers,
  tokenizers, huggingface-hub, peft, gguf; the GPU machine has torch and pyarrow), EURLEX-57K's id/title/labels
  columns (train, dev) and label table, the SmolLM2 tokenizer (for the smoke run), the first part of the GGUF file;
- ``.gpu/b``: the rest of the GGUF file and its sha256 (stage b checks it after joining the parts);
- ``.gpu/c``: all-MiniLM-L6-v2 with its weights stored fp16 (stage c restores fp32).

Needs this machine's dev install (the builtin models' packages) and a package index for ``pip download``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository root (this file is bench/gpu/gpu_prepare.py)
WHEELS = ["transformers", "tokenizers", "huggingface-hub", "peft", "gguf"]
GGUF_SPLIT = 36_000_000  # bytes in part a: a's other contents + this stay under 64 MiB


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / ".gpu")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "eurlex57k")
    args = parser.parse_args()

    import pyarrow.parquet as pq
    from safetensors.torch import load_file, save_file

    from xmctag.models.gguf_cache import cached_model_dir, gguf_path
    from xmctag.models.registry import resolve_model_path

    a, b, c = (args.out / x for x in "abc")
    for folder in (a, b, c):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)

    pins = [f"{name}=={importlib.metadata.version(name)}" for name in WHEELS]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "-d", str(a / "wheels"), *pins], check=True)

    (a / "data" / "eurlex57k").mkdir(parents=True)
    for split in ("train", "dev"):
        table = pq.read_table(args.data / f"{split}.parquet", columns=["id", "title", "labels"])
        pq.write_table(table, a / "data" / "eurlex57k" / f"{split}.parquet")
    shutil.copy(args.data / "labels.parquet", a / "data" / "eurlex57k" / "labels.parquet")

    smollm2 = cached_model_dir("smollm2-135m")
    (a / "smol-tok").mkdir()
    for path in smollm2.iterdir():
        if path.suffix != ".safetensors" and path.is_file() and path.name != "source.json":
            shutil.copy(path, a / "smol-tok" / path.name)

    data = gguf_path("smollm2-135m").read_bytes()
    (a / "gguf.aa").write_bytes(data[:GGUF_SPLIT])
    (b / "gguf.ab").write_bytes(data[GGUF_SPLIT:])
    (b / "gguf.sha256").write_text(hashlib.sha256(data).hexdigest() + "\n")

    minilm = Path(resolve_model_path("builtin:minilm-l6"))
    (c / "minilm").mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (minilm / name).exists():
            shutil.copy(minilm / name, c / "minilm" / name)
    weights = load_file(minilm / "model.safetensors")
    save_file({k: v.half().contiguous() for k, v in weights.items()}, c / "minilm" / "model.fp16.safetensors")

    for folder in (a, b, c):
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        print(f"{folder}: {size / 2**20:.1f} MiB{'  (over 64 MiB!)' if size > 64 * 2**20 else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
