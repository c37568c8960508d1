"""The settings of a training run, settled before anything is written: every "auto" resolved, lengths checked.

``resolve_settings(config, train_path)`` -> the ``Config`` the run saves as ``config.json``, so that it says what was
used rather than "auto":

- ``vision``: ``"auto"`` becomes ``DEFAULT_VISION_ENCODER`` (``builtin:efficientnet-lite0+colour``) when the training
  catalog has the image column, else ``"none"`` (text only); a vision model named explicitly needs that column.
- ``loss`` / ``centering``: ``"auto"`` becomes what suits the backbone's kind (``xmctag.models.build``).

(``epochs`` / ``classifier_epochs`` "auto" are plans, not settings: measured when their stage starts,
``xmctag.training.budget``, and recorded in ``metrics.json``.) A run whose images all turn out unusable falls back
to ``vision = "none"`` later (``xmctag.training.images``), and saves that.

``check_lengths(config, tokenizer, backbone, label_images)``: ``max_length`` and ``label_max_length`` against the
backbone, before anything is written.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from xmctag.config import Config
from xmctag.errors import UserError
from xmctag.io.datasets import table_columns
from xmctag.models.backbone import is_decoder_config
from xmctag.models.build import resolve_kind_defaults
from xmctag.models.prompt import prompt_tokenizer
from xmctag.vision.registry import DEFAULT_VISION_ENCODER


def resolve_settings(config: Config, train: str | Path) -> Config:
    """``config`` with every "auto" setting resolved (see the module docstring)."""
    return resolve_kind_defaults(resolve_vision(config, train))


def resolve_vision(config: Config, train: str | Path) -> Config:
    """``config`` with ``vision`` either ``"none"`` or a vision model name."""
    if config.vision == "none" or not Path(train).is_file():  # a missing file is reported by the data loader
        return config
    has_images = config.image_col in table_columns(Path(train))
    if config.vision == "auto":
        return dataclasses.replace(config, vision=DEFAULT_VISION_ENCODER if has_images else "none")
    if not has_images:
        raise UserError(f"{train}: --vision {config.vision} needs the image column {config.image_col!r} "
                        f"(set --image-col, or --vision none for text only)")
    return config


def check_lengths(config: Config, tokenizer, backbone, label_images: bool) -> None:
    """``max_length`` and ``label_max_length`` against the backbone, before anything is written.

    A sequence longer than the model's position embeddings trains as long as no text reaches that length, then
    crashes tagging in ONNX Runtime. Encoders read ``max_images`` image tokens on top of the text; a decoder's prompt
    holds them and its fixed parts within the length (``xmctag.models.prompt``), which must leave room for text.
    """
    images = config.vision != "none"
    lengths = [("max_length", config.max_length, images),
               ("label_max_length", config.label_max_length, images and label_images)]
    decoder = is_decoder_config(backbone.config)
    if decoder:
        template = prompt_tokenizer(tokenizer, backbone.config, config).template
        for name, value, has_image in lengths:
            template.title_budget(value, has_image, setting=name)
    limit = getattr(backbone.config, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return
    # RoBERTa-style embeddings number positions from padding_idx + 1: that many fewer are usable.
    padding_idx = getattr(getattr(backbone, "embeddings", None), "padding_idx", None)
    usable = limit - (padding_idx + 1 if isinstance(padding_idx, int) else 0)
    for name, value, has_image in lengths:
        slots = config.max_images if has_image and not decoder else 0
        if value + slots > usable:
            plus = f" + {slots} image token(s)" if slots else ""
            raise UserError(f"{name} {value}{plus} is more than the {usable} positions of {config.encoder} "
                            f"(max_position_embeddings {limit}); set {name} to at most {usable - slots}")
