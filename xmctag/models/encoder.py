"""The Siamese text encoder: one transformer embeds both products and label texts.

``TextEncoder`` wraps a Hugging Face backbone, a BERT-like encoder or a decoder LLM (Qwen2, Llama, Mistral, ...:
``xmctag.models.build``), and returns the pooled, L2-normalised embedding of each sequence: mean over the real
tokens (default) or the last real token (``pooling="last"``, decoders: the EOS that closes the prompt).

Each encoder saves and loads itself (``save(directory)`` / ``load(directory)``): its backbone under ``model/`` (a
plain Hugging Face model, LoRA adapters merged) and, when centring is on, ``pooling_center.npy`` beside it; and it
configures its own optimiser (``param_groups`` / ``configure_optimizers``, nanoGPT's pattern), so that the training
stages need not know which weights train at which rate.

Decoders keep their causal attention and read right-padded sequences; position ids are always taken from the
attention mask (``cumsum - 1``), so a row's embedding does not depend on its batch neighbours or on padding.

Seam for image fusion: ``forward`` also takes ``extra_embeds`` ``(B, E, H)`` with ``extra_mask`` ``(B, E)``,
already-embedded tokens (e.g. a projected image embedding). Encoders place them *before* the text tokens, as the
ViXML encoder variant does. Decoders place them *after* the text, just before each row's last real token (the EOS
of the prompt ``prefix ⊕ title ⊕ image prefix ⊕ IMG ⊕ EOS``, ``xmctag.models.prompt``): a causal model only lets
a token see what comes before it, so an image token first would be read by every text token but would itself see
nothing, and the EOS must stay last for ``pooling="last"``. Either way, position ids come from the mask, so that
a masked-out extra token (a product without an image) leaves the embedding exactly as if it were not there.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from xmctag.config import Config
from xmctag.models.backbone import is_decoder_config
from xmctag.models.files import MODEL_DIR, POOLING_CENTER


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(B, T, H)`` hidden states, ``(B, T)`` 0/1 mask -> ``(B, H)`` mean over unmasked tokens (not normalised)."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    summed = (hidden * weights).sum(dim=1)
    return summed / weights.sum(dim=1).clamp(min=1.0)


def last_token_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(B, T, H)``, ``(B, T)`` 0/1 mask -> ``(B, H)`` hidden state of each row's last real token (not normalised).

    "Last" is the highest unmasked position, so it also holds where masked extra tokens sit mid-sequence.
    """
    positions = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
    last = (positions * (mask > 0)).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


POOLING = {"mean": mean_pool, "last": last_token_pool}


def insert_before_last(token_embeds: torch.Tensor, mask: torch.Tensor, extra_embeds: torch.Tensor,
                       extra_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(B, T, H)`` text and ``(B, E, H)`` extras -> ``(B, T + E, H)`` and its ``(B, T + E)`` mask.

    Row i of length L becomes ``text[:L-1] ⊕ extras ⊕ text[L-1] ⊕ padding``: the extras go after the text and before
    its last real token (the EOS), and the sequence stays right-padded. A gather, so it exports to ONNX.
    """
    batch, length, n_extra = token_embeds.shape[0], token_embeds.shape[1], extra_embeds.shape[1]
    last = (mask.sum(dim=1, keepdim=True) - 1).clamp(min=0)  # (B, 1): index of the EOS in the text
    out_pos = torch.arange(length + n_extra, device=mask.device).unsqueeze(0).expand(batch, -1)
    is_extra = (out_pos >= last) & (out_pos < last + n_extra)
    # Source index into cat([text, extras]): text j -> j, extra k -> length + k; text after the extras shifts by E.
    source = torch.where(out_pos < last, out_pos, torch.where(is_extra, length + out_pos - last, out_pos - n_extra))
    embeds = torch.cat([token_embeds, extra_embeds.to(token_embeds.dtype)], dim=1)
    gathered = torch.gather(embeds, 1, source.unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))
    full_mask = torch.cat([mask, extra_mask.to(mask.dtype)], dim=1)
    return gathered, torch.gather(full_mask, 1, source)


class TextEncoder(nn.Module):
    """``input_ids``, ``attention_mask`` ``(B, T)`` -> ``{"embedding": (B, H)}``, unit-norm rows.

    ``backbone`` is a ``transformers`` base model (``AutoModel``). ``self.config`` is the backbone's config: the
    ONNX exporter (Optimum) reads model dimensions from it. ``pooling``: ``"mean"`` or ``"last"``.

    ``centering`` (``Config.centering = "ema"``, decoders' default): the pooled vector minus ``self.center`` is
    what gets L2-normalised. A pretrained LLM's pooled embeddings share one large common component (unrelated titles
    are nearly parallel: bench/RESULTS.md, "Decoder LLMs on a GPU"), and a triplet loss over hard negatives then
    heads for its trivial minimum, every embedding alike, as the fastest way to shrink gaps it cannot yet rank.
    While training, ``center`` follows the running mean of the pooled vectors of every forward pass, products and
    labels alike (an exponential moving average with ``center_momentum``, started at the first batch's mean; DINO's
    remedy for collapse), so moving all embeddings toward one point gains nothing after centring. In eval mode it is
    a constant: items stay independent of each other, and the export bakes it in.
    """

    def __init__(self, backbone: nn.Module, pooling: str = "mean", centering: bool = False,
                 center_momentum: float = 0.9):
        super().__init__()
        if pooling not in POOLING:
            raise ValueError(f"pooling must be one of {', '.join(POOLING)}, not {pooling!r}")
        self.backbone = backbone
        self.config = backbone.config
        self.pooling = pooling
        self.is_decoder = is_decoder_config(backbone.config)
        self.center_momentum = center_momentum
        if centering:
            self.register_buffer("center", torch.zeros(self.dim))
            self.register_buffer("center_updates", torch.zeros((), dtype=torch.long))
        else:
            self.center = None

    def _embedding(self, hidden: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pools, centres (when on; updating the running centre in training mode) and L2-normalises."""
        pooled = POOLING[self.pooling](hidden, mask)
        if self.center is not None:
            if self.training:
                with torch.no_grad():
                    batch_mean = pooled.detach().float().mean(dim=0)
                    # A tensor, not a Python branch: reading center_updates would sync a GPU on every pass.
                    keep = (self.center_updates > 0).float() * self.center_momentum
                    self.center.mul_(keep).add_(batch_mean * (1.0 - keep))
                    self.center_updates += 1
            pooled = pooled - self.center.to(pooled.dtype)
        return {"embedding": nn.functional.normalize(pooled, p=2, dim=-1)}

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
        if self.is_decoder:
            return self._decoder_forward(input_ids, attention_mask, extra_embeds, extra_mask)
        if extra_embeds is None:
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return self._embedding(hidden, attention_mask)
        token_embeds = self.backbone.get_input_embeddings()(input_ids)
        embeds = torch.cat([extra_embeds.to(token_embeds.dtype), token_embeds], dim=1)
        mask = torch.cat([extra_mask.to(attention_mask.dtype), attention_mask], dim=1)
        # Positions count only real tokens, so a masked extra token does not shift the text's positions.
        position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
        hidden = self.backbone(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids).last_hidden_state
        return self._embedding(hidden, mask)

    # -- training ------------------------------------------------------------------------------------------------
    def learning_rate(self, config: Config) -> float:
        """``lora_lr`` when LoRA adapters are what trains (a decoder with ``lora_rank`` > 0), else ``lr``."""
        return config.lora_lr if self.is_decoder and config.lora_rank > 0 else config.lr

    def param_groups(self, config: Config, lr: float | None = None) -> list[dict]:
        """AdamW parameter groups: the trainable weights at ``lr`` (default: ``learning_rate(config)``)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad],
                 "lr": self.learning_rate(config) if lr is None else lr}]

    def configure_optimizers(self, config: Config, lr: float | None = None,
                             extra_groups: list[dict] = ()) -> torch.optim.AdamW:
        """AdamW over ``param_groups(config, lr)`` and ``extra_groups`` (e.g. a classifier head), with
        ``config.weight_decay``."""
        return torch.optim.AdamW([*self.param_groups(config, lr), *extra_groups],
                                 lr=self.learning_rate(config), weight_decay=config.weight_decay)

    # -- saving and loading ----------------------------------------------------------------------------------------
    def save(self, directory: Path, tokenizer=None) -> None:
        """Writes ``directory/model/`` (backbone with any LoRA adapters merged, and ``tokenizer`` when given) and,
        with centring, ``directory/pooling_center.npy``."""
        from xmctag.models.lora import save_backbone

        directory = Path(directory)
        save_backbone(self.backbone, directory / MODEL_DIR)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory / MODEL_DIR)
        if self.center is not None:
            np.save(directory / POOLING_CENTER, self.center.detach().float().cpu().numpy())

    @classmethod
    def load(cls, directory: Path, pooling: str = "mean", **kwargs) -> "TextEncoder":
        """What ``save`` wrote; ``kwargs`` go to the constructor (e.g. a ``FusedEncoder``'s ``vision_dim``)."""
        from transformers import AutoModel

        directory = Path(directory)
        backbone = AutoModel.from_pretrained(directory / MODEL_DIR, local_files_only=True)
        encoder = cls(backbone, pooling=pooling, centering=(directory / POOLING_CENTER).exists(), **kwargs)
        if encoder.center is not None:
            encoder.center.copy_(torch.from_numpy(np.load(directory / POOLING_CENTER, allow_pickle=False)))
            encoder.center_updates.fill_(1)
        return encoder

    def _decoder_forward(self, input_ids, attention_mask, extra_embeds, extra_mask) -> dict[str, torch.Tensor]:
        """Causal attention over right-padded rows; extras (if any) just before each row's EOS; positions from mask."""
        inputs = {"input_ids": input_ids}
        mask = attention_mask
        if extra_embeds is not None:
            token_embeds = self.backbone.get_input_embeddings()(input_ids)
            embeds, mask = insert_before_last(token_embeds, attention_mask, extra_embeds, extra_mask)
            inputs = {"inputs_embeds": embeds}
        # Computed here (and so inside the exported graph) rather than left to the backbone: positions count real
        # tokens only, which makes a masked extra token invisible and keeps each row independent of padding.
        position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
        hidden = self.backbone(**inputs, attention_mask=mask, position_ids=position_ids, use_cache=False)
        return self._embedding(hidden.last_hidden_state, mask)
