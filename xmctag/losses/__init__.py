"""Training losses over a batch's product-label scores: ``(B, U)`` scores, ``(B,)`` positive column, ``(B, U)``
relevance mask -> a scalar. ``make_loss`` picks the one the config names."""

from __future__ import annotations

from torch import nn

from xmctag.config import Config


def make_loss(config: Config) -> nn.Module:
    from xmctag.losses.infonce import InfoNCELoss
    from xmctag.losses.triplet import TripletOHNMLoss

    if config.loss == "infonce":
        return InfoNCELoss(config.temperature)
    if config.loss == "triplet":
        return TripletOHNMLoss(config.num_negatives, config.margin_min, config.margin_max)
    raise ValueError(f"loss {config.loss!r}: resolve \"auto\" first (xmctag.training.settings.resolve_settings)")
