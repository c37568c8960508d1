"""Product images for ViXML's image token: sources and decoding (``images``), frozen vision encoders
(``encoders``, PyTorch; ``onnx_runtime``, ONNX Runtime only), preprocessing as data (``preprocess``), the on-disk
embedding cache (``cache``), catalog embedding and per-batch features (``embed``), ONNX export (``onnx_export``),
the colour histogram appended by ``+colour`` names (``colour``), model names (``registry``) and tagging's cache
lookups and vision graph (``tagging``).

Importing this package imports nothing heavy; ``encoders`` and ``onnx_export`` import torch.
"""
