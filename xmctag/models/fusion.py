"""Image fusion (ViXML early fusion): frozen vision features -> a learned projection -> extra tokens of the encoder.

``FusedEncoder``: a ``TextEncoder`` with ``image_projection = nn.Linear(V, hidden)``. ``forward(input_ids,
attention_mask, image_embedding (B, M, V), image_mask (B, M))`` -> ``{"embedding": (B, hidden)}``. Each image slot
becomes one token (several images: several tokens, as the ViXML reference code does, rather than their mean: the
encoder's attention weighs them, and a masked slot simply drops out). The tokens go through ``TextEncoder``'s seam:
before the text for encoders, after the text and before the EOS for decoders; positions come from the mask, so a
product without a usable image is encoded exactly as text-only, whatever its batch neighbours have. The image inputs
themselves are plain data (``xmctag.models.image_inputs.ImageInputs``).

Saving and loading extend ``TextEncoder``'s: the projection's weights go to ``image_projection.safetensors`` (with
``vision_dim`` in its metadata), and its own AdamW group trains at ``image_lr``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from xmctag.config import Config
from xmctag.models.encoder import TextEncoder
from xmctag.models.files import PROJECTION_FILE


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

    def param_groups(self, config: Config, lr: float | None = None) -> list[dict]:
        """The encoder's trainable weights at ``lr`` (default: its training rate), the projection at ``image_lr``."""
        projection = list(self.image_projection.parameters())
        skip = {id(p) for p in projection}
        return [{"params": [p for p in self.parameters() if p.requires_grad and id(p) not in skip],
                 "lr": self.learning_rate(config) if lr is None else lr},
                {"params": projection, "lr": config.image_lr}]

    def save(self, directory: Path, tokenizer=None) -> None:
        from safetensors.torch import save_file

        super().save(directory, tokenizer)
        state = {k: v.detach().float().cpu().contiguous() for k, v in self.image_projection.state_dict().items()}
        save_file(state, str(Path(directory) / PROJECTION_FILE),
                  metadata={"vision_dim": str(self.vision_dim), "hidden": str(self.dim)})

    @classmethod
    def load(cls, directory: Path, pooling: str = "mean", **kwargs) -> "FusedEncoder":
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(directory) / PROJECTION_FILE
        with safe_open(str(path), framework="pt") as f:
            vision_dim = int(f.metadata()["vision_dim"])
        encoder = super().load(directory, pooling=pooling, vision_dim=vision_dim, **kwargs)
        encoder.image_projection.load_state_dict(load_file(str(path)))
        return encoder
