"""``xmctag export``: a trained run directory -> a tagging bundle that needs only ONNX Runtime, faiss and tokenizers.

Steps:
1. Export the fused encoder (``TextEncoder``: backbone + mean pooling + L2 norm) with Optimum, through a custom
   ``OnnxConfig`` for our wrapper. Graph contract: inputs ``input_ids``, ``attention_mask`` (int64, dynamic batch and
   sequence axes), output ``embedding`` (float32, ``(batch, dim)``, unit norm). A run with image fusion
   (``FusedEncoder``) adds the inputs ``image_embedding`` (float32, ``(batch, max_images, vision_dim)``: the frozen
   vision features, as cached) and ``image_mask`` (int64, ``(batch, max_images)``, 0 = no usable image in that slot);
   the projection is inside the graph, the output is unchanged. Its vision encoder is exported too (``vision.onnx``
   + ``vision.json``, ``xmctag.vision.onnx_export``) so that tagging embeds new pictures with ONNX Runtime alone:
   fp32 only, because EfficientNet-Lite0's fp16 graph misses the 5e-3 parity bar (~7e-3 on normalised features).
2. Optimise it with ONNX Runtime's transformer optimizer (fused LayerNorm/GELU/attention where patterns match):
   ``encoder.onnx`` (fp32, for CPU), and ``encoder.fp16.onnx`` (fp16 weights, fp32 inputs/outputs, for CUDA).
   Decoder LLMs (their LoRA adapters already merged into the run's weights) skip the optimizer and are only
   converted (``_convert_decoder``); their graph computes position ids from the attention mask.
3. Parity check on real rows (the training products sampled into the run directory, and label texts) against
   the PyTorch model; export fails, writing nothing, past max abs 1e-4 (fp32) or 5e-3 (fp16). With fusion the sampled
   products go through with their images and again with every image masked out (both kinds of rows).
4. Bundle: ONNX files, tokenizer, label table, label embeddings, label vectors, a faiss index over them, the
   config and a manifest (file hashes, versions, dims, tokenisation settings, parity results). Written to a
   temporary directory and renamed into place, so a failed export never leaves a half-written bundle. ``--overwrite``
   replaces only a bundle (or an empty directory), never one holding the run (``xmctag.overwrite``).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np

from xmctag import bundle as layout
from xmctag import run_dir
from xmctag.backend import runtime
from xmctag.errors import UserError
from xmctag.models.tokens import pad, pad_id_of, token_ids
from xmctag.overwrite import check_replaceable
from xmctag.progress import Progress

FP32_TOLERANCE = 1e-4
FP16_TOLERANCE = 5e-3
INT8_MIN_COSINE = 0.95  # below this the int8 graph is dropped from the bundle (optional: fp32 is the reference)
OPSET = 17


IMAGE_INPUTS = ["image_embedding", "image_mask"]


def _onnx_config_class(fusion: dict | None = None):
    """Built lazily: importing Optimum is slow and only export needs it. ``fusion``: the run's ``fusion.json``."""
    from optimum.exporters.onnx.config import TextEncoderOnnxConfig
    from optimum.utils import DummyInputGenerator, DummyTextInputGenerator, NormalizedTextConfig

    class ImageEmbeddingInputGenerator(DummyInputGenerator):
        """Dummy ``image_embedding`` ``(batch, max_images, vision_dim)`` and ``image_mask`` for tracing."""

        SUPPORTED_INPUT_NAMES = tuple(IMAGE_INPUTS)

        def __init__(self, task, normalized_config, batch_size: int = 2, **kwargs):
            self.batch_size = batch_size

        def generate(self, input_name: str, framework: str = "pt", int_dtype: str = "int64",
                     float_dtype: str = "fp32"):
            shape = [self.batch_size, fusion["max_images"]]
            if input_name == "image_embedding":
                return self.random_float_tensor(shape + [fusion["dim"]], framework=framework, dtype=float_dtype)
            return self.random_int_tensor(shape, max_value=2, min_value=0, framework=framework, dtype=int_dtype)

    class XMCEncoderOnnxConfig(TextEncoderOnnxConfig):
        """Optimum's description of our ``TextEncoder`` wrapper: ids and mask (and image inputs) in, embedding out."""

        NORMALIZED_CONFIG_CLASS = NormalizedTextConfig
        DEFAULT_ONNX_OPSET = OPSET
        DUMMY_INPUT_GENERATOR_CLASSES = (DummyTextInputGenerator,) + ((ImageEmbeddingInputGenerator,) if fusion else ())

        @property
        def inputs(self) -> dict[str, dict[int, str]]:
            axes = {0: "batch_size", 1: "sequence_length"}
            inputs = {"input_ids": dict(axes), "attention_mask": dict(axes)}
            if fusion:
                inputs.update({name: {0: "batch_size", 1: "num_images"} for name in IMAGE_INPUTS})
            return inputs

        @property
        def outputs(self) -> dict[str, dict[int, str]]:
            return {"embedding": {0: "batch_size"}}

    return XMCEncoderOnnxConfig


def export(run: str | Path, out: str | Path, fp16: bool = True, overwrite: bool = False,
           progress: bool = True) -> Path:
    """Exports the run directory ``run`` to the bundle directory ``out``; returns ``out``."""
    import torch

    show = Progress(progress)
    runtime.check_runtime_packages()  # before any work: the export needs ONNX Runtime and writes a faiss index
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"--out {out}: directory is not empty (use --overwrite to replace it)")
        check_replaceable(out, layout.is_bundle, "an xmctag bundle", {"the run": run})
    trained = run_dir.load_run(run)
    encoder, tokenizer = trained.encoder_and_tokenizer()
    fusion = run_dir.load_fusion(trained.path)
    if not tokenizer.is_fast:
        raise UserError(f"{run}: the model's tokenizer has no fast (tokenizer.json) version, which tagging needs")
    encoder.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with torch.no_grad():
            show.log("exporting the encoder to ONNX (Optimum)")
            raw = staging / "raw.onnx"
            _optimum_export(encoder, raw, fusion)
            _optimise(raw, staging / layout.ONNX_FP32, encoder.config, fp16=False, fused=fusion is not None)
            if fp16:
                _optimise(raw, staging / layout.ONNX_FP16, encoder.config, fp16=True, fused=fusion is not None)
            _quantise_int8(staging / layout.ONNX_FP32, staging / layout.ONNX_INT8, show)
            raw.unlink()
            for leftover in staging.glob("*.onnx.data"):
                leftover.unlink()
            parity = _check_parity(encoder, tokenizer, trained, staging, fp16, show)
            if fusion is not None:
                parity["vision"] = _export_vision(fusion, staging, show)
        tokenizer.save_pretrained(staging / layout.TOKENIZER)
        prompt = tokenizer.template.to_dict() if hasattr(tokenizer, "template") else None  # decoders
        layout.write_bundle_files(staging, trained, parity, pad_id_of(tokenizer), prompt=prompt, fusion=fusion)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
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
    parity = export_vision_onnx(encoder, staging, fp16=False)
    show.log(f"parity vision.onnx: max abs diff {parity['vision.onnx']['normalised']:.2e} (normalised features)")
    return parity


def _optimum_export(encoder, path: Path, fusion: dict | None = None) -> None:
    import warnings

    from optimum.exporters.onnx import export as optimum_export

    onnx_config = _onnx_config_class(fusion)(encoder.config, task="feature-extraction")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow in transformers internals
        optimum_export(model=encoder, config=onnx_config, output=path, opset=OPSET)


def _optimise(source: Path, target: Path, model_config, fp16: bool, fused: bool = False) -> None:
    """ORT transformer optimizer (graph fusions); fp16: weights in fp16, inputs and outputs kept fp32.

    ``fused``: the graph has image inputs (its attention mask may have a hole where an image slot is empty)."""
    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    from xmctag.models.decoder import is_decoder_config

    if is_decoder_config(model_config):
        _convert_decoder(source, target, fp16)
        return

    model_type = "bert" if model_config.model_type in ("bert", "distilbert", "roberta", "xlm-roberta") else "gpt2"
    options = None
    if fused:
        # The fused Attention op's default mask format is sequence lengths (a mask of 1s then 0s); an image slot
        # masked out *before* the text breaks that. The raw 2D mask keeps the fusion and any mask pattern.
        from onnxruntime.transformers.fusion_options import FusionOptions

        options = FusionOptions(model_type)
        options.use_raw_attention_mask(True)
    # Without a GPU the optimizer logs "There is no gpu for onnxruntime to do optimization." as an error for the
    # fp16 graph and skips only its ORT pre-pass; the fusions below still run, so the message is noise.
    with _quiet_loggers("onnxruntime.transformers.optimizer"):
        optimised = optimize_model(str(source), model_type=model_type, num_heads=model_config.num_attention_heads,
                                   hidden_size=model_config.hidden_size, opt_level=1, use_gpu=fp16,
                                   optimization_options=options)
    if fp16:
        optimised.convert_float_to_float16(keep_io_types=True)
    onnx.save_model(optimised.model, str(target))


def _convert_decoder(source: Path, target: Path, fp16: bool) -> None:
    """Decoder LLMs skip the transformer optimizer: its fusions assume generation-shaped inputs (its fused rotary
    embedding rejects our per-row position ids) and gain little here; ONNX Runtime's own graph optimisations still
    run when a session loads the graph. fp16 keeps the RMSNorm subgraphs in fp32: squaring the residual stream of an
    LLM overflows fp16 (its outlier channels reach the thousands). So does everything after the backbone (pooling,
    centring, L2 norm): the centre removes a component shared by all items, and what is left is a small difference
    of large numbers that fp16 would round away."""
    import onnx
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = onnx.load(str(source))
    if fp16:
        tail = [n.name for n in model.graph.node if n.name.startswith("/") and not n.name.startswith("/backbone/")]
        keep_fp32 = [n.name for n in model.graph.node if "norm/" in n.name] + tail  # tail: pooling, centre, L2 norm
        wrapped = OnnxModel(model)
        wrapped.convert_float_to_float16(keep_io_types=True, node_block_list=keep_fp32)
        model = wrapped.model
    weights = sum(len(t.raw_data) for t in model.graph.initializer)
    if weights > 1_800_000_000:  # protobuf files stop at 2 GiB: larger models keep their weights beside the graph
        onnx.save_model(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{target.name}.weights")
    else:
        onnx.save_model(model, str(target))


def _quantise_int8(source: Path, target: Path, show: Progress) -> None:
    """Dynamic int8 quantisation of the fp32 graph (MatMul weights per channel, activations quantised at run time):
    about 2x the fp32 graph on CPUs with AVX-512 VNNI (bench/RESULTS.md), at a small cost in accuracy (checked by
    ``_check_parity`` as cosine)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # DefaultTensorType: the fused ORT ops (Attention, SkipLayerNorm) defeat the quantiser's shape inference.
    try:
        with _quiet_loggers(""):  # the root logger: "Please consider to run pre-processing before quantization"
            quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True,
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    except Exception as e:  # noqa: BLE001 - optional graph: a model the quantiser cannot handle still exports
        show.log(f"warning: no int8 graph ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        target.unlink(missing_ok=True)


@contextlib.contextmanager
def _quiet_loggers(*names: str):
    """Only CRITICAL records from the loggers ``names`` ("" = root) while the block runs."""
    loggers = [logging.getLogger(name or None) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _check_parity(encoder, tokenizer, trained, staging: Path, fp16: bool, show: Progress) -> dict:
    """Max abs difference between ONNX Runtime (CPU) and PyTorch embeddings on real rows, per graph."""
    from xmctag.backend.runtime import create_session

    batches = _parity_batches(tokenizer, trained)
    results = {"rows": sum(len(b[0]) for b in batches)}
    graphs = [(layout.ONNX_FP32, FP32_TOLERANCE)] + ([(layout.ONNX_FP16, FP16_TOLERANCE)] if fp16 else [])
    if (staging / layout.ONNX_INT8).exists():
        graphs.append((layout.ONNX_INT8, None))
    import torch

    for name, tolerance in graphs:
        session = create_session(staging / name, "cpu")
        worst, min_cosine = 0.0, 1.0
        for input_ids, mask, images in batches:
            feeds = {"input_ids": input_ids, "attention_mask": mask}
            extra = {}
            if images is not None:
                extra = {"image_embedding": torch.from_numpy(images[0]), "image_mask": torch.from_numpy(images[1])}
                feeds.update(image_embedding=images[0], image_mask=images[1].astype(np.int64))
            expected = encoder(torch.from_numpy(input_ids), torch.from_numpy(mask), **extra)["embedding"].numpy()
            got = session.run(["embedding"], feeds)[0].astype(np.float32)
            worst = max(worst, float(np.abs(got - expected).max()))
            min_cosine = min(min_cosine, float((got * expected).sum(axis=1).min()))
        if tolerance is None:  # int8 is approximate by design: judged by the angle it moves embeddings by
            show.log(f"parity {name}: min cosine {min_cosine:.4f} (tolerance {INT8_MIN_COSINE}), max abs diff "
                     f"{worst:.2e} on {results['rows']} rows")
            if not min_cosine >= INT8_MIN_COSINE:
                show.log(f"warning: {name} left out of the bundle (cosine {min_cosine:.3f} < {INT8_MIN_COSINE}); "
                         "tagging uses the fp32 graph")
                del session
                (staging / name).unlink()
                continue
            results[name] = worst
            results[f"{name} min cosine"] = min_cosine
            continue
        show.log(f"parity {name}: max abs diff {worst:.2e} (tolerance {tolerance:.0e}) on {results['rows']} rows")
        if not worst <= tolerance:
            raise UserError(f"export failed the parity check: {name} differs from PyTorch by {worst:.3g} "
                            f"(max abs; tolerance {tolerance:g}); no bundle written")
        results[name] = worst
    return results


def _parity_batches(tokenizer, trained) -> list[tuple[np.ndarray, np.ndarray, tuple | None]]:
    """Padded ``(input_ids, attention_mask, images)`` batches of real rows; ``images`` = ``(features, mask)`` arrays
    for a fused run (None for text only).

    Text only: the sampled training products, then label texts, in batches of 32 of mixed lengths (padding is
    exercised). Fused: the sampled products with their images, the same products with every image slot masked out
    (and, for decoders, no image prefix), and label texts without images; batches mix rows with and without images.
    """
    texts = layout.parity_texts(trained)
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
