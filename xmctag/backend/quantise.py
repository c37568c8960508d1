"""Dynamic int8 quantisation of an fp32 graph, for CPUs."""

from __future__ import annotations

from pathlib import Path

from xmctag.backend.onnx_files import quiet_loggers


def quantise_int8(source: Path, target: Path) -> str | None:
    """MatMul weights per channel in int8, activations quantised at run time: about 2x the fp32 graph on CPUs with
    AVX-512 VNNI (bench/RESULTS.md), at a small cost in accuracy (``xmctag.backend.parity`` measures it as cosine).
    Returns None, or why no int8 graph was written (a model the quantiser cannot handle still exports)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # DefaultTensorType: the fused ORT ops (Attention, SkipLayerNorm) defeat the quantiser's shape inference.
    try:
        with quiet_loggers(""):  # the root logger: "Please consider to run pre-processing before quantization"
            quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True,
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    except Exception as e:  # noqa: BLE001 - optional graph: the fp32 graph is the reference
        target.unlink(missing_ok=True)
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return None
