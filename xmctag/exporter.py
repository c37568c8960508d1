"""``xmctag export``: a trained run directory -> a tagging bundle that needs only ONNX Runtime, faiss and tokenizers.

Steps (the tools are ``xmctag.backend``'s; the bundle layout is ``xmctag.bundle``'s):
1. Export the run's encoder (``TextEncoder`` / ``FusedEncoder``) to ONNX through Optimum. A run with image fusion
   also exports its frozen vision encoder (``vision.onnx`` + ``vision.json``, ``xmctag.vision.onnx_export``) so that
   tagging embeds new pictures with ONNX Runtime alone: fp32 only, because EfficientNet-Lite0's fp16 graph misses the
   fp16 parity bar.
2. Optimise it: ``encoder.onnx`` (fp32, for CPU), ``encoder.fp16.onnx`` (fp16 weights, fp32 inputs/outputs, for
   CUDA) and ``encoder.int8.onnx`` (dynamic int8, for CPU, used only on request).
3. Parity on real rows (the training products sampled into the run directory, and label texts) against the PyTorch
   model (``xmctag.backend.parity``); past a tolerance the export fails, writing nothing. With fusion the sampled
   products go through with their images and again with every image masked out (both kinds of rows).
4. Bundle: ONNX files, tokenizer, label table, label vectors, the searches (``xmctag.backend.index``: exact, or an
   approximate IVF index per search chosen by size with ``index="auto"``, its recall measured on the run's training
   product embeddings against exact search, exact with a warning below ``recall_floor``), the config and a manifest
   (file hashes, versions, dims, tokenisation settings, the ``index`` section, parity results). Written to a temporary
   directory and renamed into place, so a failed export never leaves a half-written bundle. ``--overwrite`` replaces
   only a bundle (or an empty directory), never one holding the run (``xmctag.overwrite``).
"""

from __future__ import annotations

import datetime
import json
import shutil
from pathlib import Path

import numpy as np

from xmctag import bundle as layout
from xmctag import manifest as manifest_file
from xmctag import run_dir
from xmctag.backend import index as searches
from xmctag.backend import parity, runtime
from xmctag.backend.export import export_text_graph
from xmctag.backend.optimise import optimise_text_graph
from xmctag.backend.quantise import quantise_int8
from xmctag.errors import UserError
from xmctag.io.atomic import staged_directory
from xmctag.models.tokens import pad, pad_id_of, token_ids
from xmctag.overwrite import check_new_output_dir
from xmctag.progress import Progress
from xmctag.summary import library_versions, run_summary
from xmctag.vision.onnx_runtime import ONNX_FP32 as VISION_FP32
from xmctag.vision.onnx_runtime import VISION_META


def export(run: str | Path, out: str | Path, fp16: bool = True, overwrite: bool = False, progress: bool = True,
           summary_json: str | Path | None = None, index: str = "auto", exact_below: int | None = None,
           recall_floor: float = searches.RECALL_FLOOR, max_nprobe: int | None = None) -> Path:
    """Exports the run directory ``run`` to the bundle directory ``out``; returns ``out``. ``summary_json``: where
    to write the export's summary, however it ends (``xmctag.summary.run_summary``).

    ``index``: the kind of each search (``auto``, ``exact``, ``ivf``; ``xmctag.backend.index``); ``auto`` is exact
    for a search over fewer than ``exact_below`` rows (default: 50,000 labels, 20,000 training products). An
    approximate search whose recall against exact search stays below ``recall_floor`` (default 0.98; a lower floor
    is the caller's explicit choice) with ``nprobe`` up to ``max_nprobe`` (default: every cell) is replaced by the
    exact one, with a warning."""
    with run_summary(summary_json, "export", run_dir=str(run), bundle=str(out)) as report:
        export_bundle(run, out, fp16, overwrite, progress,
                      {"requested": index, "exact_below": exact_below, "floor": recall_floor,
                       "max_nprobe": max_nprobe})
        manifest = json.loads((Path(out) / layout.MANIFEST).read_text())
        report.update(bundle_id=manifest["bundle_id"], graphs=manifest["graph"]["files"],
                      parity=manifest["parity_max_abs"], dims=manifest["dims"], index=manifest["index"])
    return Path(out)


def export_bundle(run: str | Path, out: str | Path, fp16: bool = True, overwrite: bool = False,
                  progress: bool = True, index: dict | None = None) -> Path:
    """The export itself (see the module docstring); ``index``: ``export``'s index settings as keyword arguments
    of ``xmctag.backend.index.label_index`` (default: ``auto``)."""
    import torch

    show = Progress(progress)
    index = index or {}
    searches.check_settings(index.get("requested", "auto"), index.get("exact_below"),
                            index.get("floor", searches.RECALL_FLOOR), index.get("max_nprobe"))
    runtime.check_runtime_packages()  # before any work: the export needs ONNX Runtime and writes a faiss index
    out = Path(out)
    check_new_output_dir(out, overwrite, layout.is_bundle, "an xmctag bundle", {"the run": run})
    trained = run_dir.load_run(run)
    encoder, tokenizer = trained.encoder_and_tokenizer()
    fusion = run_dir.load_fusion(trained.path)
    if not tokenizer.is_fast:
        raise UserError(f"{run}: the model's tokenizer has no fast (tokenizer.json) version, which tagging needs")
    encoder.eval()
    with staged_directory(out) as staging:
        with torch.no_grad():
            show.log("exporting the encoder to ONNX (Optimum)")
            raw = staging / "raw.onnx"
            export_text_graph(encoder, raw, fusion)
            graphs = {"fp32": staging / layout.ONNX_FP32}
            if fp16:
                graphs["fp16"] = staging / layout.ONNX_FP16
            for kind, graph in graphs.items():
                optimise_text_graph(raw, graph, encoder.config, fp16=kind == "fp16", fused=fusion is not None)
            failure = quantise_int8(graphs["fp32"], staging / layout.ONNX_INT8)
            if failure is None:
                graphs["int8"] = staging / layout.ONNX_INT8
            else:
                show.log(f"warning: no int8 graph ({failure})")
            raw.unlink()
            for leftover in staging.glob("*.onnx.data"):
                leftover.unlink()
            results = parity.check_text_graphs(encoder, graphs, parity_batches(tokenizer, trained), show)
            if fusion is not None:
                results["vision"] = _export_vision(fusion, staging, show)
        tokenizer.save_pretrained(staging / layout.TOKENIZER)
        prompt = tokenizer.template.to_dict() if hasattr(tokenizer, "template") else None  # decoders
        write_bundle_files(staging, trained, results, pad_id_of(tokenizer), prompt=prompt, fusion=fusion,
                           index={**index, "log": show.log})
    show.log(f"bundle written to {out}")
    return out


def _export_vision(fusion: dict, staging: Path, show: Progress) -> dict:
    """The run's frozen vision encoder as ``vision.onnx`` + ``vision.json`` (fp32 only, see the module docstring)."""
    from xmctag.vision.encoders import load_vision_encoder
    from xmctag.vision.onnx_export import export_vision_onnx

    show.log(f"exporting the vision encoder {fusion['vision']} to ONNX (fp32)")
    encoder = load_vision_encoder(fusion["vision"])
    if encoder.model_id != fusion["model_id"]:  # the features the projection was trained on would not match
        raise UserError(f"vision model {fusion['vision']} is now {encoder.model_id}, but the run was trained on "
                        f"{fusion['model_id']}; retrain, or restore that model")
    results = export_vision_onnx(encoder, staging, fp16=False)
    show.log(f"parity vision.onnx: max abs diff {results['vision.onnx']['normalised']:.2e} (normalised features)")
    return results


def parity_texts(trained: run_dir.TrainedRun, n: int = 128) -> list[str]:
    """Real rows for the export parity check: sampled training products, then label texts."""
    sample = run_dir.load_sample_texts(trained.path)
    labels = trained.labels.texts[:: max(1, len(trained.labels) // n)]
    return (sample + labels)[:n]


def parity_batches(tokenizer, trained: run_dir.TrainedRun) -> list[tuple[np.ndarray, np.ndarray, tuple | None]]:
    """Padded ``(input_ids, attention_mask, images)`` batches of real rows; ``images`` = ``(features, mask)`` arrays
    for a fused run (None for text only).

    Text only: the sampled training products, then label texts, in batches of 32 of mixed lengths (padding is
    exercised). Fused: the sampled products with their images, the same products with every image slot masked out
    (and, for decoders, no image prefix), and label texts without images; batches mix rows with and without images.
    """
    texts = parity_texts(trained)
    max_length = trained.config.max_length
    pad_id = pad_id_of(tokenizer)
    samples = run_dir.load_sample_images(trained.path)
    if samples is None:
        ids = token_ids(tokenizer, texts, max_length)
        return [(*pad(ids[s:s + 32], pad_id), None) for s in range(0, len(ids), 32)]
    features, mask = samples
    n = len(features)
    sampled = run_dir.load_sample_texts(trained.path)[:n]
    rows_texts = sampled + sampled + texts[len(sampled):]
    rows_features = np.concatenate([features, features, np.zeros((len(rows_texts) - 2 * n, *features.shape[1:]),
                                                                 np.float32)])
    rows_mask = np.concatenate([mask, np.zeros((len(rows_texts) - n, mask.shape[1]), np.float32)])
    order = np.random.default_rng(0).permutation(len(rows_texts))  # with and without images in each batch
    batches = []
    for s in range(0, len(order), 32):
        rows = order[s:s + 32]
        ids = token_ids(tokenizer, [rows_texts[i] for i in rows], max_length, rows_mask[rows].sum(axis=1) > 0)
        batches.append((*pad(ids, pad_id), (rows_features[rows], rows_mask[rows])))
    return batches


def write_bundle_files(target: Path, trained: run_dir.TrainedRun, parity_results: dict, pad_id: int,
                       prompt: dict | None = None, fusion: dict | None = None, index: dict | None = None) -> None:
    """Everything but the ONNX graphs and tokenizer (already in ``target``): labels, index, config, and the manifest,
    sealed last (``xmctag.manifest.seal``: the hashes of every file in ``target``, and the bundle id over them and
    the manifest).

    ``prompt``: a decoder's ``PromptTemplate.to_dict()``, stored as ``tokenization.prompt`` (the tagger then builds
    ``prefix ids + title ids[:budget] + eos`` from it instead of using the tokenizer's special tokens).
    ``fusion``: the run's ``fusion.json`` (image fusion): stored as the manifest's ``fusion`` section, with the
    vision graph's files; the text graph then has the ``image_embedding`` and ``image_mask`` inputs.
    ``index``: keyword arguments of ``xmctag.backend.index.label_index`` / ``neighbour_index`` (kind, threshold,
    floor, nprobe cap, log); the searches' entries become the manifest's ``index`` section.
    """
    faiss = runtime.faiss()
    index = index or {}
    for name in layout.COPIED_FROM_RUN:
        shutil.copy2(trained.path / name, target / name)
    lexical = None
    if (trained.path / run_dir.LEXICAL).is_dir():
        shutil.copytree(trained.path / run_dir.LEXICAL, target / run_dir.LEXICAL)
        spec = json.loads((target / run_dir.LEXICAL / "lexical.json").read_text())
        lexical = {"folder": run_dir.LEXICAL, "bands": spec["fusion"]["bands"], "weights": spec["fusion"]["weights"],
                   "candidates": spec["settings"]["candidates"], "beam": spec["settings"]["beam"],
                   "score": "(1 - a_l) * dense score + a_l * lexical score, a_l = weights[band of label l's "
                            "training count: <= bands[0], <= bands[1], ..., above]"}
    vectors = np.load(trained.path / run_dir.LABEL_VECTORS, mmap_mode="r", allow_pickle=False)  # [w_l, b_l] rows
    neighbours = run_dir.load_neighbours(trained.path)
    # Real rows to measure an approximate search on: training products, else (a run without them) label texts.
    if neighbours is not None:
        queries = neighbours[0]
    else:
        queries, _ = searches.query_sample(trained.label_embeddings)
        queries /= np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    label_index, entry = searches.label_index(vectors, queries, trained.vectors.scale, **index)
    sections = {"labels": entry}
    if label_index is not None:  # exact: label_vectors.npy is searched directly (one copy of the matrix)
        faiss.write_index(label_index, str(target / layout.INDEX))
    n_neighbours = 0
    if neighbours is not None:
        embeddings, labels = neighbours
        k = max(1, trained.config.knn_neighbours)
        neighbour_index, sections["neighbours"] = searches.neighbour_index(embeddings, k, **index)
        faiss.write_index(neighbour_index, str(target / layout.NEIGHBOUR_INDEX))
        shutil.copy2(trained.path / run_dir.TRAIN_LABELS, target / run_dir.TRAIN_LABELS)
        if (trained.path / run_dir.TRAIN_IDS).exists():  # runs from before 2026-12-03 have none: no --evidence
            shutil.copy2(trained.path / run_dir.TRAIN_IDS, target / run_dir.TRAIN_IDS)
        n_neighbours = len(labels)
    config = trained.config
    manifest = {
        "format": manifest_file.FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source_run": str(trained.path.resolve()),
        "versions": library_versions(),
        "dims": {"embedding": int(vectors.shape[1] - 1), "index": int(vectors.shape[1]), "labels": len(vectors),
                 "neighbours": n_neighbours},
        "graph": {"inputs": ["input_ids", "attention_mask"] + (list(layout.IMAGE_INPUTS) if fusion else []),
                  "outputs": ["embedding"],
                  "files": [n for n in layout.GRAPHS_BY_PRECISION.values() if (target / n).exists()]},
        "tokenization": {"tokenizer": f"{layout.TOKENIZER}/tokenizer.json", "max_length": config.max_length,
                         "pad_id": pad_id, "text_cols": config.text_cols, "separator": " ; ", "padding": "right",
                         "truncation": True},
        "training": {"rows": trained.n_train, "encoder": config.encoder},
        "index": sections,
        "scoring": {"score": "(1 - knn_weight) * sigmoid(scale * <[embedding, 1], label vector>) + knn_weight * "
                             "neighbour vote (see xmctag/scoring/ranking.py)",
                    "scale": trained.vectors.scale,
                    "knn_neighbours": config.knn_neighbours if n_neighbours else 0,
                    "knn_temperature": config.knn_temperature,
                    "knn_weight": config.knn_weight if n_neighbours else 0.0},
        "parity_max_abs": parity_results,
    }
    if prompt is not None:
        manifest["tokenization"]["prompt"] = prompt
    if fusion is not None:
        manifest["fusion"] = fusion_manifest(fusion, decoder=prompt is not None)
    if lexical is not None:
        manifest["lexical"] = lexical
    manifest_file.seal(target, manifest)  # files: every file's sha256; bundle_id: manifest_file.bundle_id_of


def fusion_manifest(fusion: dict, decoder: bool) -> dict:
    """The manifest's ``fusion`` section: what the tagger needs to build the image inputs (see ``xmctag.tagger``)."""
    return {
        "vision": fusion["vision"], "model_id": fusion["model_id"], "vision_dim": fusion["dim"],
        "image_col": fusion["image_col"], "max_images": fusion["max_images"],
        "cache_dir": fusion["cache_dir"],  # the training run's image cache: tagging's default
        "image_token": "after the text, before the EOS" if decoder else "before the text",
        "inputs": {"image_embedding": "float32 (batch, max_images, vision_dim): cached vision features",
                   "image_mask": "int64 (batch, max_images): 1 = usable image in that slot"},
        "vision_graph": {"files": [VISION_FP32], "meta": VISION_META,
                         "precision": "fp32 only: EfficientNet-Lite0's fp16 graph misses the 5e-3 parity bar"},
    }
