"""The ONNX backend, one concept per module, used by text and vision graphs alike:

- ``onnx_files``: reading and writing ONNX files (weights beside the graph above protobuf's limit), the opset;
- ``export``: PyTorch -> ONNX (the text encoder through Optimum, the vision encoder through ``torch.onnx``);
- ``optimise``: ONNX Runtime's transformer optimizer and the fp16 conversions;
- ``quantise``: dynamic int8 quantisation for CPUs;
- ``parity``: ONNX Runtime against PyTorch on real inputs, with the tolerances a bundle must meet;
- ``runtime``: the installed ONNX Runtime and faiss, inference sessions, devices.

``xmctag.exporter`` assembles these into a bundle; the tagger needs only ``runtime``.
"""
