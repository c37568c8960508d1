"""Triplet loss with online hard negatives and a dynamic margin (NGAME / PRIME / ViXML).

Inputs: ``scores`` ``(B, U)`` inner products between the B products of a batch and the U distinct labels
sampled for it; ``positive`` ``(B,)`` the column of each product's sampled positive; ``is_relevant`` ``(B, U)``
True where a label is relevant to a product (those columns are never used as negatives).

For each product the ``num_negatives`` highest-scoring irrelevant labels of the batch are its negatives, and

    loss = sum_n relu(s_n - s_p + m_n),   m_n = clamp(|s_p - s_n|, margin_min, margin_max)  (no gradient)

summed over negatives, averaged over products. The margin grows with the gap, so badly ranked negatives are
pushed harder, while a satisfied pair still keeps at least ``margin_min`` of slack.
"""

from __future__ import annotations

import torch
from torch import nn


class TripletOHNMLoss(nn.Module):
    def __init__(self, num_negatives: int = 10, margin_min: float = 0.1, margin_max: float = 0.3):
        super().__init__()
        self.num_negatives = num_negatives
        self.margin_min = margin_min
        self.margin_max = margin_max

    def forward(self, scores: torch.Tensor, positive: torch.Tensor, is_relevant: torch.Tensor) -> torch.Tensor:
        k = min(self.num_negatives, scores.shape[1] - 1)
        if k <= 0:
            return scores.sum() * 0.0
        s_pos = scores.gather(1, positive.view(-1, 1))  # (B, 1)
        masked = scores.masked_fill(is_relevant, float("-inf"))
        s_neg, _ = masked.topk(k, dim=1)  # (B, k); -inf where a product has fewer than k negatives
        valid = torch.isfinite(s_neg)
        s_neg = torch.where(valid, s_neg, torch.zeros_like(s_neg))
        margin = (s_pos - s_neg).abs().detach().clamp(self.margin_min, self.margin_max)
        loss = torch.relu(s_neg - s_pos + margin) * valid
        return loss.sum(dim=1).mean()
