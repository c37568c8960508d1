"""The training checkpoint file: a nested state of tensors, arrays and plain values in one safetensors file, no pickle.

``run_dir.save_checkpoint`` writes a run's ``checkpoint.safetensors`` with ``save``; ``--resume`` reads it with
``load``. Reading it runs no code from the file (``torch.load`` of a pickle would: any ``checkpoint.pt`` can), only
the safetensors parser and ``json``.

File format (safetensors: an 8-byte header length, a JSON header, the raw tensor bytes)::

    tensors    every tensor and numpy array of the state, named by its path in the state, "/"-joined
               ("state/encoder/backbone.pooler.dense.weight", "state/optimizer/state/3/exp_avg", "torch_rng";
               a name already taken gets "#2", "#3", ...); numpy arrays are stored as tensors of the same dtype
    metadata   "format": "xmctag-checkpoint", "version": "1",
               "state": the state as JSON, each tensor replaced by a reference to its name:

        None, bool, int, float (NaN and infinities as Python's json writes them), str    as themselves
        list                                                                                JSON array
        dict whose keys are str, none starting with "$"                                     JSON object
        any other dict (keys None, bool, int, float or str)      {"$dict": [[key, value], ...]}
        tuple                                                     {"$tuple": [...]}
        torch.Tensor                                              {"$tensor": name}
        numpy.ndarray                                             {"$ndarray": name}
        LabelVectors                                              {"$label_vectors": {"vectors": {"$ndarray": ..},
                                                                    "bias": {"$ndarray": ..}, "scale": float}}

``load`` rebuilds exactly what ``save`` got (tensors on the CPU, arrays as numpy of their dtype, tuples, dicts with
their key types, ``LabelVectors``) and raises ``CheckpointError`` for a file that is not one of these (truncated,
not safetensors, bad or missing metadata, a reference to a missing tensor, a tensor nothing refers to).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from xmctag.errors import first_line
from xmctag.scoring.label_vectors import LabelVectors

FORMAT, VERSION = "xmctag-checkpoint", "1"
_SCALARS = (type(None), bool, int, float, str)


class CheckpointError(ValueError):
    """The file is not a readable checkpoint (the message says why)."""


def save(path: Path, state: dict, tmp: Path) -> None:
    """Writes ``state`` to ``path``: first to ``tmp``, flushed to disk, then renamed over ``path``, so that a crash
    leaves the previous checkpoint (or none), never a truncated one."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, (), tensors, set())
    save_file(tensors, tmp, metadata={"format": FORMAT, "version": VERSION, "state": json.dumps(tree)})
    with open(tmp, "r+b") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if os.name == "posix":  # the rename itself, durable
        fd = os.open(Path(path).parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def load(path: Path) -> Any:
    """What ``save`` wrote; ``CheckpointError`` when the file is not a readable checkpoint."""
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            names = f.keys()
            tensors = {name: f.get_tensor(name) for name in names}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"not a safetensors file ({first_line(e)})") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"no {FORMAT!r} format in its metadata")
    if metadata.get("version") != VERSION:
        raise CheckpointError(f"version {metadata.get('version')!r}, this xmctag reads version {VERSION}")
    try:
        tree = json.loads(metadata["state"])
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"bad state in its metadata ({first_line(e)})") from None
    used: set[str] = set()
    state = _decode(tree, tensors, used)
    if unused := sorted(set(tensors) - used):
        raise CheckpointError(f"tensor {unused[0]!r} is not part of the state")
    return state


# -- encoding -----------------------------------------------------------------------------------------------------
def _encode(value, path: tuple, tensors: dict, storages: set):
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, torch.Tensor):
        return {"$tensor": _add(value, path, tensors, storages)}
    if isinstance(value, np.ndarray):
        array = value if value.dtype.isnative else value.astype(value.dtype.newbyteorder("="))
        return {"$ndarray": _add(torch.from_numpy(np.ascontiguousarray(array)), path, tensors, storages)}
    if isinstance(value, LabelVectors):
        return {"$label_vectors": {"vectors": _encode(value.vectors, (*path, "vectors"), tensors, storages),
                                   "bias": _encode(value.bias, (*path, "bias"), tensors, storages),
                                   "scale": float(value.scale)}}
    if isinstance(value, tuple):
        return {"$tuple": [_encode(v, (*path, i), tensors, storages) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, (*path, i), tensors, storages) for i, v in enumerate(value)]
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, _SCALARS):
                raise TypeError(f"checkpoint: dict key {key!r} at {_name(path)!r} is not None, bool, int, float "
                                "or str")
        items = {k: _encode(v, (*path, k), tensors, storages) for k, v in value.items()}
        if all(isinstance(k, str) and not k.startswith("$") for k in items):
            return items
        return {"$dict": [[k, v] for k, v in items.items()]}
    raise TypeError(f"checkpoint: cannot store a {type(value).__name__} (at {_name(path)!r})")


def _name(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def _add(tensor: torch.Tensor, path: tuple, tensors: dict, storages: set) -> str:
    """Adds ``tensor`` (on the CPU, contiguous, storage of its own: what safetensors takes) under a free name."""
    tensor = tensor.detach().to("cpu")
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    storage = tensor.untyped_storage().data_ptr()
    if storage in storages:  # shares memory with a tensor already stored (tied weights, views)
        tensor = tensor.clone()
        storage = tensor.untyped_storage().data_ptr()
    if storage:  # 0: an empty tensor
        storages.add(storage)
    base = _name(path) or "state"
    name, n = base, 1
    while name in tensors:
        n += 1
        name = f"{base}#{n}"
    tensors[name] = tensor
    return name


# -- decoding -----------------------------------------------------------------------------------------------------
def _decode(value, tensors: dict, used: set):
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, list):
        return [_decode(v, tensors, used) for v in value]
    if not isinstance(value, dict):
        raise CheckpointError(f"unexpected {type(value).__name__} in its state")
    tags = [k for k in value if k.startswith("$")]
    if not tags:
        return {k: _decode(v, tensors, used) for k, v in value.items()}
    if len(value) != 1:
        raise CheckpointError(f"an object with {tags[0]!r} and other keys in its state")
    tag, body = tags[0], value[tags[0]]
    if tag in ("$tensor", "$ndarray"):
        if not isinstance(body, str) or body not in tensors:
            raise CheckpointError(f"its state refers to a tensor {body!r} it does not hold")
        used.add(body)
        return tensors[body] if tag == "$tensor" else tensors[body].numpy()
    if tag == "$tuple" and isinstance(body, list):
        return tuple(_decode(v, tensors, used) for v in body)
    if tag == "$dict" and isinstance(body, list) and all(isinstance(p, list) and len(p) == 2 for p in body):
        items = [(_decode(k, tensors, used), _decode(v, tensors, used)) for k, v in body]
        if not all(isinstance(k, _SCALARS) for k, _ in items):
            raise CheckpointError("a dict key that is not None, bool, int, float or str in its state")
        return dict(items)
    if tag == "$label_vectors" and isinstance(body, dict) and set(body) == {"vectors", "bias", "scale"}:
        vectors, bias = _decode(body["vectors"], tensors, used), _decode(body["bias"], tensors, used)
        if not (isinstance(vectors, np.ndarray) and isinstance(bias, np.ndarray) and vectors.ndim == 2
                and bias.shape == vectors.shape[:1] and isinstance(body["scale"], (int, float))):
            raise CheckpointError("label vectors that are not (L, d) vectors, (L,) bias and a scale")
        return LabelVectors(vectors, bias, body["scale"])
    raise CheckpointError(f"a malformed {tag!r} object in its state")
