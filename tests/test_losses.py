"""losses/: the triplet (OHNM) and InfoNCE losses by hand, their gradients and edge cases; the config picks one."""

import numpy as np
import pytest
import torch

from xmctag.config import Config
from xmctag.losses import make_loss
from xmctag.losses.infonce import InfoNCELoss
from xmctag.losses.triplet import TripletOHNMLoss


def test_triplet_loss_by_hand():
    scores = torch.tensor([[0.9, 0.8, 0.2, 0.95],    # positive col 0; col 3 also relevant (never a negative)
                           [0.1, 0.5, 0.4, 0.0]])    # positive col 0
    relevant = torch.tensor([[True, False, False, True], [True, False, False, False]])
    loss = TripletOHNMLoss(num_negatives=2, margin_min=0.1, margin_max=0.3)(scores, torch.tensor([0, 0]), relevant)
    # row 0: negatives 0.8 (gap 0.1 -> margin 0.1 -> relu(0.8-0.9+0.1)=0) and 0.2 (gap 0.7 -> margin 0.3 -> 0)
    # row 1: negatives 0.5 (gap 0.4 -> margin 0.3 -> 0.5-0.1+0.3=0.7) and 0.4 (gap 0.3 -> 0.4-0.1+0.3=0.6)
    assert loss.item() == pytest.approx((0.0 + 1.3) / 2)


def test_triplet_loss_gradient_pulls_positive_and_pushes_negative():
    scores = torch.tensor([[0.2, 0.6, 0.1]], requires_grad=True)
    loss = TripletOHNMLoss(num_negatives=1)(scores, torch.tensor([0]), torch.tensor([[True, False, False]]))
    loss.backward()
    assert scores.grad[0, 0] < 0 and scores.grad[0, 1] > 0 and scores.grad[0, 2] == 0  # only the hardest negative


def test_triplet_loss_with_too_few_negatives():
    scores = torch.tensor([[0.5, 0.1]])
    loss = TripletOHNMLoss(num_negatives=10)(scores, torch.tensor([0]), torch.tensor([[True, False]]))
    assert loss.item() == pytest.approx(0.0)  # 0.1 - 0.5 + margin 0.3 < 0; missing negatives add nothing


def test_infonce_by_hand_leaves_other_relevant_labels_out():
    scores = torch.tensor([[0.9, 0.8, 0.2, 0.95],    # positive col 0; col 3 also relevant: not in the softmax
                           [0.1, 0.5, 0.4, 0.0]])    # positive col 2
    relevant = torch.tensor([[True, False, False, True], [False, False, True, False]])
    loss = InfoNCELoss(temperature=0.1)(scores, torch.tensor([0, 2]), relevant)
    row0 = -torch.log_softmax(torch.tensor([9.0, 8.0, 2.0]), 0)[0]
    row1 = -torch.log_softmax(torch.tensor([1.0, 5.0, 4.0, 0.0]), 0)[2]
    assert loss.item() == pytest.approx(((row0 + row1) / 2).item(), rel=1e-6)


def test_identical_scores_cost_chance_level_for_infonce_and_the_margin_floor_for_the_triplet_loss():
    """All scores alike (a collapsed encoder): log(#candidates) for the softmax loss, which any ranking of the
    positive above the rest beats; num_negatives x margin_min for the triplet loss."""
    scores = torch.full((1, 21), 0.7)
    relevant = torch.zeros(1, 21, dtype=torch.bool)
    relevant[0, 0] = True
    assert InfoNCELoss(0.05)(scores, torch.tensor([0]), relevant).item() == pytest.approx(np.log(21))
    assert TripletOHNMLoss(10, 0.1, 0.3)(scores, torch.tensor([0]), relevant).item() == pytest.approx(1.0)


def test_the_config_picks_the_loss():
    assert isinstance(make_loss(Config(loss="triplet")), TripletOHNMLoss)
    assert make_loss(Config(loss="infonce", temperature=0.2)).temperature == 0.2
    with pytest.raises(ValueError, match="auto"):  # "auto" depends on the model: train() resolves it first
        make_loss(Config())
