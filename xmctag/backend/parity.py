"""Parity: an exported graph, run with ONNX Runtime on the CPU, against the PyTorch model on real inputs.

Tolerances (max abs difference of unit-norm embeddings; for vision graphs, of L2-normalised features, since raw
features have model-dependent scales): ``FP32_TOLERANCE`` 1e-4, ``FP16_TOLERANCE`` 5e-3. A graph past its tolerance
raises ``ParityError`` and the export writes nothing. The int8 graph is approximate by design: it is judged by the
angle it moves embeddings by (``INT8_MIN_COSINE``) and left out of the bundle below it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from xmctag.backend.runtime import create_session
from xmctag.errors import UserError
from xmctag.progress import Progress

FP32_TOLERANCE = 1e-4
FP16_TOLERANCE = 5e-3
INT8_MIN_COSINE = 0.95  # below this the int8 graph is dropped from the bundle (optional: fp32 is the reference)


class ParityError(UserError):
    """An exported graph disagrees with PyTorch beyond its tolerance."""


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def text_graph_difference(encoder, graph: Path, batches) -> tuple[float, float]:
    """``(max abs difference, min cosine)`` of the graph's embeddings against ``encoder``'s on ``batches`` of
    ``(input_ids, attention_mask, images)`` (``images``: ``(features, mask)`` arrays, or None)."""
    import torch

    session = create_session(graph, "cpu")
    worst, min_cosine = 0.0, 1.0
    for input_ids, mask, images in batches:
        feeds = {"input_ids": input_ids, "attention_mask": mask}
        extra = {}
        if images is not None:
            extra = {"image_embedding": torch.from_numpy(images[0]), "image_mask": torch.from_numpy(images[1])}
            feeds.update(image_embedding=images[0], image_mask=images[1].astype(np.int64))
        with torch.no_grad():
            expected = encoder(torch.from_numpy(input_ids), torch.from_numpy(mask), **extra)["embedding"].numpy()
        got = session.run(["embedding"], feeds)[0].astype(np.float32)
        worst = max(worst, float(np.abs(got - expected).max()))
        min_cosine = min(min_cosine, float((got * expected).sum(axis=1).min()))
    return worst, min_cosine


def check_text_graphs(encoder, graphs: dict[str, Path], batches, show: Progress) -> dict:
    """Parity of each graph (``"fp32"``, ``"fp16"``, ``"int8"`` -> file); returns the results by file name (what the
    bundle manifest records). Raises ``ParityError`` past a tolerance; an int8 graph below ``INT8_MIN_COSINE`` is
    deleted, with a warning, and left out of the results."""
    results = {"rows": sum(len(b[0]) for b in batches)}
    tolerances = {"fp32": FP32_TOLERANCE, "fp16": FP16_TOLERANCE}
    for kind, graph in graphs.items():
        worst, min_cosine = text_graph_difference(encoder, graph, batches)
        name = graph.name
        if kind == "int8":
            show.log(f"parity {name}: min cosine {min_cosine:.4f} (tolerance {INT8_MIN_COSINE}), max abs diff "
                     f"{worst:.2e} on {results['rows']} rows")
            if not min_cosine >= INT8_MIN_COSINE:
                show.log(f"warning: {name} left out of the bundle (cosine {min_cosine:.3f} < {INT8_MIN_COSINE}); "
                         "tagging uses the fp32 graph")
                graph.unlink()
                continue
            results[name] = worst
            results[f"{name} min cosine"] = min_cosine
            continue
        tolerance = tolerances[kind]
        show.log(f"parity {name}: max abs diff {worst:.2e} (tolerance {tolerance:.0e}) on {results['rows']} rows")
        if not worst <= tolerance:
            raise ParityError(f"export failed the parity check: {name} differs from PyTorch by {worst:.3g} "
                              f"(max abs; tolerance {tolerance:g}); no bundle written")
        results[name] = worst
    return results


def vision_graph_difference(graph: Path, pixels: np.ndarray, expected: np.ndarray, input_name: str,
                            output_name: str) -> tuple[float, float]:
    """``(raw max abs difference, max abs difference after L2-normalising rows)`` of the graph's features against
    ``expected``, run one picture at a time and as one batch (the dynamic batch axis is exercised)."""
    session = create_session(graph, "cpu")
    single = np.concatenate([session.run([output_name], {input_name: pixels[i:i + 1]})[0]
                             for i in range(len(pixels))])
    batched = session.run([output_name], {input_name: pixels})[0]
    raw = normalised = 0.0
    for got in (single, batched):
        got = got.astype(np.float32)
        raw = max(raw, float(np.abs(got - expected).max()))
        normalised = max(normalised, float(np.abs(unit(got) - unit(expected)).max()))
    return raw, normalised
