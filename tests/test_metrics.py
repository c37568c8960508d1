"""Metrics against hand-computed cases."""

import math

import numpy as np
import pytest

from xmctag.evaluation.metrics import evaluate_rankings, inverse_propensity

# Two rows. Row 0: truth {0, 1}, ranking [0, 2, 1]. Row 1: truth {3}, ranking [1, 2, 3].
PRED = np.array([[0, 2, 1], [1, 2, 3]])
TRUTH = [np.array([0, 1]), np.array([3])]


def test_precision_recall_ndcg_by_hand():
    m = evaluate_rankings(PRED, TRUTH, ks=(1, 2, 3))
    assert m["P@1"] == pytest.approx((1 + 0) / 2)
    assert m["P@2"] == pytest.approx((1 / 2 + 0) / 2)
    assert m["P@3"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert m["R@1"] == pytest.approx((1 / 2 + 0) / 2)
    assert m["R@3"] == pytest.approx((1 + 1) / 2)
    # Row 0 at 3: hits at ranks 1 and 3 -> DCG 1 + 1/log2(4) = 1.5; ideal (2 relevant) 1 + 1/log2(3).
    row0 = 1.5 / (1 + 1 / math.log2(3))
    row1 = (1 / math.log2(4)) / 1.0  # one hit at rank 3, ideal one relevant at rank 1
    assert m["nDCG@3"] == pytest.approx((row0 + row1) / 2)
    assert m["nDCG@1"] == pytest.approx((1 + 0) / 2)
    assert "PSP@1" not in m


def test_psp_by_hand():
    inv_p = np.array([1.0, 4.0, 2.0, 3.0])
    m = evaluate_rankings(PRED, TRUTH, ks=(1, 3), inv_p=inv_p)
    # @1: gains 1 (label 0 in row 0) + 0; ideal: row 0 best is label 1 (4), row 1 label 3 (3) -> 1 / 7.
    assert m["PSP@1"] == pytest.approx(1 / 7)
    # @3: gains 1 + 4 + 3 = 8; ideal 1 + 4 + 3 = 8.
    assert m["PSP@3"] == pytest.approx(1.0)


def test_padding_and_empty_truth_rows():
    pred = np.array([[5, -1, -1], [-1, -1, -1]])
    truth = [np.array([5]), np.array([], dtype=np.int64)]
    m = evaluate_rankings(pred, truth, ks=(1, 3))
    assert m["P@1"] == pytest.approx(0.5)  # the empty-truth row counts as zero
    assert m["P@3"] == pytest.approx((1 / 3) / 2)
    assert m["R@3"] == pytest.approx(0.5)
    assert m["nDCG@3"] == pytest.approx(0.5)


def test_perfect_ranking_scores_one():
    truth = [np.array([0, 1, 2]), np.array([3, 4, 5])]
    pred = np.array([[1, 0, 2], [3, 4, 5]])  # relevant labels, rarest first (best for PSP too)
    m = evaluate_rankings(pred, truth, ks=(1, 3), inv_p=inverse_propensity(np.array([5, 1, 9, 2, 2, 40]), 50))
    assert all(v == pytest.approx(1.0) for name, v in m.items() if name != "R@1")
    assert m["R@1"] == pytest.approx(1 / 3)


def test_inverse_propensity_formula():
    # Jain et al. 2016: 1/p = 1 + C (N_l + B)^-A, C = (log N - 1)(B + 1)^A.
    n, a, b = 1000, 0.55, 1.5
    c = (math.log(n) - 1) * (b + 1) ** a
    got = inverse_propensity(np.array([0, 10, 1000]), n, a, b)
    assert got == pytest.approx([1 + c * (0 + b) ** -a, 1 + c * (10 + b) ** -a, 1 + c * (1000 + b) ** -a])
    assert got[0] > got[1] > got[2] > 1  # rare labels weigh more
