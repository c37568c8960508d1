"""The files an encoder writes when it saves itself (``TextEncoder.save``, ``FusedEncoder.save``) into a directory.

Torch-free, so that the run-directory layout (``xmctag.run_dir``) can name them without importing torch.
"""

MODEL_DIR = "model"  # the backbone and its tokenizer, Hugging Face format (LoRA adapters merged)
POOLING_CENTER = "pooling_center.npy"  # centering on: the mean subtracted before the L2 norm
PROJECTION_FILE = "image_projection.safetensors"  # image fusion: the trained projection (weight, bias; vision_dim)
