"""The Siamese text encoder: one transformer embeds both products and label texts.

``TextEncoder`` wraps a Hugging Face backbone (BERT-like encoders today; decoder LLMs plug in here later) and
returns the mean-pooled, L2-normalised embedding of each sequence.

Seam for image fusion: ``forward`` also takes ``extra_embeds`` ``(B, E, H)`` with ``extra_mask`` ``(B, E)``,
already-embedded tokens (e.g. a projected image embedding) that are placed *before* the text tokens, as the
ViXML encoder variant does. Position ids are derived from the attention mask, so that a masked-out extra token
(a product without an image) leaves the text embedding exactly as if it were not there.
"""

from __future__ import annotations

import torch
from torch import nn


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(B, T, H)`` hidden states, ``(B, T)`` 0/1 mask -> ``(B, H)`` L2-normalised mean over unmasked tokens."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    summed = (hidden * weights).sum(dim=1)
    pooled = summed / weights.sum(dim=1).clamp(min=1.0)
    return nn.functional.normalize(pooled, p=2, dim=-1)


class TextEncoder(nn.Module):
    """``input_ids``, ``attention_mask`` ``(B, T)`` -> ``{"embedding": (B, H)}``, unit-norm rows.

    ``backbone`` is a ``transformers`` base model (``AutoModel``). ``self.config`` is the backbone's config: the
    ONNX exporter (Optimum) reads model dimensions from it.
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config

    @property
    def dim(self) -> int:
        return int(self.config.hidden_size)

    def transformer_blocks(self) -> nn.ModuleList:
        """The backbone's stack of transformer layers, bottom first (BERT-like, DistilBERT, decoder LLMs)."""
        for path in ("encoder.layer", "transformer.layer", "layers", "h"):
            module = self.backbone
            for name in path.split("."):
                module = getattr(module, name, None)
            if isinstance(module, nn.ModuleList):
                return module
        raise ValueError(f"cannot find the transformer layers of {type(self.backbone).__name__}")

    def freeze_bottom(self, n_layers: int) -> None:
        """Freezes the token embeddings and the lowest ``n_layers`` blocks (cheaper training: no backward there).

        Gradients still flow *through* the frozen blocks to anything below that trains (e.g. an image projection).
        """
        if n_layers <= 0:
            return
        self.backbone.get_input_embeddings().requires_grad_(False)
        embeddings = getattr(self.backbone, "embeddings", None)  # BERT-like: positions, token types, LayerNorm
        if embeddings is not None:
            embeddings.requires_grad_(False)
        for block in self.transformer_blocks()[:n_layers]:
            block.requires_grad_(False)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        extra_embeds: torch.Tensor | None = None,
        extra_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        if extra_embeds is None:
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return {"embedding": mean_pool(hidden, attention_mask)}
        token_embeds = self.backbone.get_input_embeddings()(input_ids)
        embeds = torch.cat([extra_embeds.to(token_embeds.dtype), token_embeds], dim=1)
        mask = torch.cat([extra_mask.to(attention_mask.dtype), attention_mask], dim=1)
        # Positions count only real tokens, so a masked extra token does not shift the text's positions.
        position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
        hidden = self.backbone(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids).last_hidden_state
        return {"embedding": mean_pool(hidden, mask)}
