"""ONNX Runtime and faiss, the two runtime packages chosen by install extra.

``onnxruntime`` and ``onnxruntime-gpu`` (likewise ``faiss-cpu`` and ``faiss-gpu``) install the same Python module
and overwrite each other's files, so exactly one of each pair may be installed in an environment:
``pip install "xmctag[cpu]"`` or ``pip install "xmctag[gpu]"``, never both. ``check_runtime_packages`` fails early
with a message saying what to do.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from pathlib import Path

from xmctag.errors import UnreadableFile, UserError, first_line


class CudaUnavailable(UserError):
    """ONNX Runtime has its CUDA provider but could not start it (no GPU, or CUDA/cuDNN libraries missing)."""

_PAIRS = {
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "faiss": ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss-gpu-cu11"),
}


def _import_runtime(module_name: str):
    """Imports ``onnxruntime`` or ``faiss``, refusing an environment where two of its distributions collide."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"{module_name} is not importable ({e}). Install one runtime set: "
                        f"pip install 'xmctag[cpu]' (or 'xmctag[gpu]' on a CUDA machine)") from None
    site = Path(module.__file__).resolve().parent.parent
    found = []
    for dist in importlib.metadata.distributions(path=[str(site)]):
        if dist.metadata["Name"] and dist.metadata["Name"].lower() in _PAIRS[module_name]:
            found.append(dist.metadata["Name"])
    if len(set(found)) > 1:
        raise UserError(
            f"both {' and '.join(sorted(set(found)))} are installed in {site}; they overwrite each other's "
            f"module. Run `pip uninstall -y {' '.join(sorted(set(found)))}`, then install exactly one runtime set: "
            f"pip install 'xmctag[cpu]' or 'xmctag[gpu]'")
    return module


def onnxruntime():
    ort = _import_runtime("onnxruntime")
    if hasattr(ort, "preload_dlls"):  # onnxruntime-gpu: load the CUDA libraries that torch/pip provide, if any
        try:
            ort.preload_dlls()
        except Exception:  # noqa: BLE001 - a CPU machine has none to load; that is fine
            pass
    return ort


def faiss():
    return _import_runtime("faiss")


def check_runtime_packages() -> None:
    onnxruntime()
    faiss()


def cuda_available() -> bool:
    return "CUDAExecutionProvider" in onnxruntime().get_available_providers()


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when ONNX Runtime has its CUDA provider, else ``cpu``."""
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, not {device!r}")
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if device == "cuda" and not cuda_available():
        raise UserError("--device cuda: ONNX Runtime has no CUDA provider here (install 'xmctag[gpu]' on a CUDA "
                        "machine, see README)")
    return device


def create_session(path: str | Path, device: str = "cpu", threads: int | None = None):
    ort = onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as e:  # noqa: BLE001 - ORT raises its own exception types; the message is what matters
        raise UnreadableFile(f"{path}: ONNX Runtime cannot load this model ({first_line(e)})", path,
                             first_line(e)) from None
    # ONNX Runtime falls back to the CPU with only a log line when the CUDA provider's libraries (CUDA, cuDNN) fail
    # to load; a nightly GPU job would then run the fp16 graph on the CPU for hours. Say so instead.
    if device == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        raise CudaUnavailable(f"{path}: ONNX Runtime could not start its CUDA provider (no GPU, or the CUDA/cuDNN "
                              "libraries onnxruntime-gpu is built for are missing: see README, GPU notes); run with "
                              "--device cpu or --device auto")
    return session
