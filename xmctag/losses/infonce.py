"""Softmax contrastive loss (InfoNCE) over the labels of a batch: decoders' default (``loss = "auto"``).

Same inputs as ``TripletOHNMLoss``: ``scores`` ``(B, U)`` product-label inner products, ``positive`` ``(B,)`` the
column of each product's sampled positive, ``is_relevant`` ``(B, U)``. Each product's other relevant labels are left
out of its softmax (they are not negatives), then

    loss = -log softmax(scores / temperature)[positive],  averaged over products.

Why decoders use it: a model that does not yet rank positives above its hardest negatives (a pretrained decoder
LLM) can lower the triplet loss by shrinking every score gap, since its hardest negatives sit above the positive by
an amount proportional to the spread of the scores (the collapse that ``TextEncoder``'s centring is there to stop).
The softmax keeps pushing every negative away; identical scores cost log(U) here. With SmolLM2 on EURLEX titles the
triplet loss left the dual encoder near chance while InfoNCE trained it (bench/RESULTS.md, "Decoder LLMs on a GPU").
"""

from __future__ import annotations

import torch
from torch import nn


class InfoNCELoss(nn.Module):
    def __init__(self, temperature: float = 0.05):
        super().__init__()
        self.temperature = temperature

    def forward(self, scores: torch.Tensor, positive: torch.Tensor, is_relevant: torch.Tensor) -> torch.Tensor:
        is_positive = torch.zeros_like(is_relevant)
        is_positive[torch.arange(len(positive), device=positive.device), positive] = True
        logits = (scores / self.temperature).masked_fill(is_relevant & ~is_positive, float("-inf"))
        return nn.functional.cross_entropy(logits, positive)
