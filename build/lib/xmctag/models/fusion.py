"""Image fusion (ViXML early fusion): frozen vision features -> a learned projection -> extra tokens of the encoder.

- ``ImageInputs``: the image side of a set of items, numpy only: ``features`` ``(N, M, V)`` float32 (the frozen vision
  encoder's pooled features, from the cache) and ``mask`` ``(N, M)`` float32 0/1 (0: empty slot, missing, broken or
  never-embedded image). ``M`` is ``max_images``.
- ``FusedEncoder``: a ``TextEncoder`` with ``image_projection = nn.Linear(V, hidden)``. ``forward(input_ids,
  attention_mask, image_embedding (B, M, V), image_mask (B, M))`` -> ``{"embedding": (B, hidden)}``. Each image slot
  becomes one token (several images: several tokens, as the ViXML reference code does, rather than their mean: the
  encoder's attention weighs them, and a masked slot simply drops out). The tokens go through ``TextEncoder``'s seam:
  before the text for encoders, after the text and before the EOS for decoders; positions come from the mask, so a
  product without a usable image is encoded exactly as text-only, whatever its batch neighbours have.
- ``save_projection`` / ``load_projection``: the projection's weights as ``image_projection.safetensors``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from xmctag.models.encoder import TextEncoder


@dataclass
class ImageInputs:
    """``features`` ``(N, M, V)`` float32 and ``mask`` ``(N, M)`` float32 0/1 of N items (see the module docstring)."""

    features: np.ndarray
    mask: np.ndarray

    def __len__(self) -> int:
        return len(self.mask)

    @property
    def has_image(self) -> np.ndarray:
        """``(N,)`` bool: the item has at least one usable image (decoders: its prompt has the image prefix)."""
        return self.mask.sum(axis=1) > 0

    def take(self, rows) -> "ImageInputs":
        rows = np.asarray(rows)
        return ImageInputs(self.features[rows], self.mask[rows])

    def tensors(self, device) -> dict[str, torch.Tensor]:
        """The keyword arguments of ``FusedEncoder.forward``."""
        return {"image_embedding": torch.from_numpy(np.ascontiguousarray(self.features)).to(device),
                "image_mask": torch.from_numpy(np.ascontiguousarray(self.mask)).to(device)}


class FusedEncoder(TextEncoder):
    """``TextEncoder`` + ``image_projection``; without ``image_embedding`` it is the plain text encoder."""

    def __init__(self, backbone: nn.Module, vision_dim: int, pooling: str = "mean", **kwargs):
        super().__init__(backbone, pooling=pooling, **kwargs)
        self.vision_dim = int(vision_dim)
        self.image_projection = nn.Linear(self.vision_dim, self.dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                image_embedding: torch.Tensor | None = None,
                image_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if image_embedding is None:
            return super().forward(input_ids, attention_mask)
        tokens = self.image_projection(image_embedding.to(self.image_projection.weight.dtype))
        return super().forward(input_ids, attention_mask, extra_embeds=tokens, extra_mask=image_mask)

    @torch.no_grad()
    def init_projection(self, sample: np.ndarray | None) -> None:
        """Random projection scaled so that projected image tokens have the median norm of the text's token
        embeddings on ``sample`` ``(n, V)`` features (real ones: vision features have model-dependent scales, and a
        decoder has no LayerNorm between its input embeddings and the first block to absorb a mismatch)."""
        weight = self.image_projection.weight
        nn.init.normal_(weight)
        nn.init.zeros_(self.image_projection.bias)
        token_norm = self.backbone.get_input_embeddings().weight.float().norm(dim=1).median()
        if sample is not None and len(sample):
            projected = torch.from_numpy(np.asarray(sample, np.float32)).to(weight.device) @ weight.float().T
            norm = projected.norm(dim=1).mean().clamp(min=1e-6)
        else:
            norm = torch.tensor(float(self.vision_dim) ** 0.5)
        weight.mul_((token_norm / norm).to(weight.dtype))


def make_encoder(backbone: nn.Module, vision_dim: int | None = None, **options) -> TextEncoder:
    """A ``FusedEncoder`` when ``vision_dim`` is given (image fusion), else a ``TextEncoder``; ``options`` go to
    ``TextEncoder`` (``pooling``, ``centering``, ``center_momentum``)."""
    return FusedEncoder(backbone, vision_dim, **options) if vision_dim else TextEncoder(backbone, **options)


PROJECTION_FILE = "image_projection.safetensors"


def save_projection(encoder: FusedEncoder, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().float().cpu().contiguous() for k, v in encoder.image_projection.state_dict().items()}
    save_file(state, str(path), metadata={"vision_dim": str(encoder.vision_dim), "hidden": str(encoder.dim)})


def load_projection(encoder: FusedEncoder, path: Path) -> None:
    from safetensors.torch import load_file

    encoder.image_projection.load_state_dict(load_file(str(path)))
