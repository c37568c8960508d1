"""Graph optimisation and fp16 conversion with ONNX Runtime's tools.

- ``optimise_text_graph``: ONNX Runtime's transformer optimizer (fused LayerNorm/GELU/attention where patterns match)
  for encoder graphs, optionally with fp16 weights (inputs and outputs kept fp32, for CUDA). Decoder LLMs (their LoRA
  adapters already merged) skip the optimizer and are only converted (``convert_decoder``).
- ``to_fp16``: ONNX Runtime's generic float16 converter (the vision graphs).
"""

from __future__ import annotations

import warnings
from pathlib import Path

from xmctag.backend.onnx_files import load_onnx, quiet_loggers, save_onnx
from xmctag.models.backbone import is_decoder_config


def optimise_text_graph(source: Path, target: Path, model_config, fp16: bool, fused: bool = False) -> None:
    """ORT transformer optimizer (graph fusions); fp16: weights in fp16, inputs and outputs kept fp32.

    ``fused``: the graph has image inputs (its attention mask may have a hole where an image slot is empty)."""
    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    if is_decoder_config(model_config):
        convert_decoder(source, target, fp16)
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
    with quiet_loggers("onnxruntime.transformers.optimizer"):
        optimised = optimize_model(str(source), model_type=model_type, num_heads=model_config.num_attention_heads,
                                   hidden_size=model_config.hidden_size, opt_level=1, use_gpu=fp16,
                                   optimization_options=options)
    if fp16:
        optimised.convert_float_to_float16(keep_io_types=True)
    onnx.save_model(optimised.model, str(target))


def convert_decoder(source: Path, target: Path, fp16: bool) -> None:
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


def to_fp16(source: Path, target: Path) -> None:
    """fp16 weights and activations, fp32 inputs and outputs (ONNX Runtime's float16 converter)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "values truncated to fp16 range": tiny weights become 0, as intended
        model = convert_float_to_float16(load_onnx(source), keep_io_types=True)
    save_onnx(model, target)
