"""Building and loading encoders: which class, which defaults for the backbone's kind, what trains.

- ``resolve_kind_defaults(config, model_config)``: ``loss`` / ``centering`` "auto" -> what suits the backbone's kind
  (decoders: InfoNCE on centred embeddings; encoders: the triplet loss, no centring). The rule lives here; the
  training run resolves every "auto" setting in one place (``xmctag.training.settings``) and saves the result.
- ``make_encoder(backbone, vision_dim, ...)``: a ``FusedEncoder`` with image fusion, else a ``TextEncoder``.
- ``prepare_model(tokenizer, backbone, config, device)`` -> ``(tokenizer, encoder)`` ready to train. Encoders come
  back as they are (full fine-tuning). Decoders get their prompt tokenizer (``xmctag.models.prompt``), LoRA adapters
  (``xmctag.models.lora``; only the adapters train; ``lora_rank = 0`` fine-tunes everything instead) and gradient
  checkpointing on every device: activations are what fills memory with 30-layer models and batches of 128 pairs.
- ``load_encoder(directory, pooling)``: what ``TextEncoder.save`` / ``FusedEncoder.save`` wrote, as the right class.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from xmctag.config import Config
from xmctag.models.backbone import is_decoder_config
from xmctag.models.encoder import TextEncoder
from xmctag.models.files import PROJECTION_FILE
from xmctag.models.fusion import FusedEncoder


def resolve_kind_defaults(config: Config, model_config=None) -> Config:
    """``config`` with ``loss`` and ``centering`` "auto" resolved for its encoder's kind.

    Why decoders differ: untrained, a decoder's mean-pooled embeddings share one dominant direction, and the triplet
    loss then shrinks every score gap toward its collapse value instead of separating; centring removes the shared
    direction and InfoNCE's softmax keeps pushing all negatives away (bench/RESULTS.md, "Decoder LLMs on a GPU").
    ``model_config``: the backbone's Hugging Face config when at hand (else read from ``config.encoder``).
    """
    if config.loss != "auto" and config.centering != "auto":
        return config
    if model_config is None:
        from xmctag.models.registry import load_model_config

        model_config = load_model_config(config.encoder)
    decoder = is_decoder_config(model_config)
    return dataclasses.replace(
        config,
        loss=("infonce" if decoder else "triplet") if config.loss == "auto" else config.loss,
        centering=("ema" if decoder else "none") if config.centering == "auto" else config.centering)


def make_encoder(backbone: torch.nn.Module, vision_dim: int | None = None, **options) -> TextEncoder:
    """A ``FusedEncoder`` when ``vision_dim`` is given (image fusion), else a ``TextEncoder``; ``options`` go to
    ``TextEncoder`` (``pooling``, ``centering``, ``center_momentum``)."""
    return FusedEncoder(backbone, vision_dim, **options) if vision_dim else TextEncoder(backbone, **options)


def prepare_model(tokenizer, backbone, config: Config, device: torch.device, vision_dim: int | None = None):
    """``(tokenizer, encoder)`` on ``device``, set up for training as described in the module docstring.

    ``vision_dim``: image fusion on; the encoder is a ``FusedEncoder`` with a fresh projection from that width.
    """
    from xmctag.models.lora import add_lora
    from xmctag.models.prompt import prompt_tokenizer

    config = resolve_kind_defaults(config, backbone.config)
    encoder = make_encoder(backbone, vision_dim, pooling=config.pooling, centering=config.centering == "ema",
                           center_momentum=config.center_momentum)
    if not encoder.is_decoder:
        return tokenizer, encoder.to(device)
    tokenizer = prompt_tokenizer(tokenizer, backbone.config, config)
    if config.lora_rank > 0:
        add_lora(backbone, config)  # touches the backbone only: an image projection stays trainable
    if config.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen embeddings (no inputs that require grad needed).
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return tokenizer, encoder.to(device)


def load_encoder(directory: Path, pooling: str = "mean") -> TextEncoder:
    """The encoder saved in ``directory``: a ``FusedEncoder`` when it has a trained image projection."""
    cls = FusedEncoder if (Path(directory) / PROJECTION_FILE).exists() else TextEncoder
    return cls.load(directory, pooling=pooling)
