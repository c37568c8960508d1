"""The blended scoring (label vectors + neighbour votes) against hand-computed cases and a brute-force version."""

import numpy as np
import pytest

from xmctag.scoring import NeighbourLabels, blend_top_k


def test_votes_are_normalised_softmax_weights_summed_per_label():
    labels = NeighbourLabels.from_lists([np.array([0, 1]), np.array([1]), np.array([2, 3])])
    neighbours = np.array([[0, 1, -1], [2, 0, 1]])
    sims = np.array([[0.9, 0.5, 0.0], [0.8, 0.8, 0.1]])
    rows, labs, votes = labels.votes(neighbours, sims, temperature=2.0)
    w0 = np.exp(2 * np.array([0.0, -0.4]))
    w0 /= w0.sum()
    w1 = np.exp(2 * np.array([0.0, 0.0, -0.7]))
    w1 /= w1.sum()
    expected = {(0, 0): w0[0], (0, 1): w0[0] + w0[1], (1, 2): w1[0], (1, 3): w1[0], (1, 0): w1[1],
                (1, 1): w1[1] + w1[2]}
    got = {(int(r), int(lab)): v for r, lab, v in zip(rows, labs, votes)}
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert abs(got[key] - value) < 1e-12


def brute_force(queries, matrix, scale, labels, neighbour_emb, k_nn, temperature, weight, k):
    logits = np.hstack([queries, np.ones((len(queries), 1))]) @ matrix.T
    prob = 1 / (1 + np.exp(-scale * logits))
    sims = queries @ neighbour_emb.T
    out = []
    for i in range(len(queries)):
        nn = np.argsort(-sims[i])[:k_nn]
        w = np.exp(temperature * (sims[i, nn] - sims[i, nn].max()))
        w /= w.sum()
        vote = np.zeros(len(matrix))
        for j, wj in zip(nn, w):
            vote[labels[j]] += wj
        out.append((1 - weight) * prob[i] + weight * vote)
    return np.array(out)


def test_blend_matches_brute_force_over_all_labels():
    rng = np.random.default_rng(0)
    n_labels, dim, n_train = 300, 8, 200
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    matrix = np.hstack([rng.normal(size=(n_labels, dim)) * 0.3, rng.normal(size=(n_labels, 1)) * 0.1])
    train = unit(rng.normal(size=(n_train, dim)))
    train_labels = [rng.choice(n_labels, size=rng.integers(1, 6), replace=False) for _ in range(n_train)]
    queries = unit(rng.normal(size=(20, dim)))
    expected = brute_force(queries, matrix, 5.0, train_labels, train, 10, 10.0, 0.5, 5)

    lv_logits = np.hstack([queries, np.ones((20, 1))]) @ matrix.T
    candidates = np.argsort(-lv_logits, axis=1)[:, :32]
    sims = queries @ train.T
    nn = np.argsort(-sims, axis=1)[:, :10]
    votes = NeighbourLabels.from_lists(train_labels).votes(nn, np.take_along_axis(sims, nn, 1), 10.0)
    top, scores = blend_top_k(queries, matrix, 5.0, candidates, np.take_along_axis(lv_logits, candidates, 1), votes,
                              0.5, 5)
    np.testing.assert_allclose(scores, np.sort(expected, axis=1)[:, ::-1][:, :5], rtol=1e-6)
    np.testing.assert_allclose(np.take_along_axis(expected, top, 1), scores, rtol=1e-6)


def test_fewer_candidates_than_k_are_marked_missing():
    matrix = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    queries = np.array([[1.0, 0.0]])
    top, scores = blend_top_k(queries, matrix, 10.0, np.array([[0, 1]]), np.array([[1.0, 0.0]]), None, 0.5, 4)
    assert top.tolist() == [[0, 1, -1, -1]]
    np.testing.assert_allclose(scores[0, :2], [1 / (1 + np.exp(-10)), 0.5])
    assert scores[0, 2:].tolist() == [0.0, 0.0]


def test_exclusive_groups_keep_the_best_label_of_each_group_and_fill_from_the_others():
    rng = np.random.default_rng(1)
    n_labels, dim = 60, 8
    matrix = np.hstack([rng.normal(size=(n_labels, dim)), rng.normal(size=(n_labels, 1)) * 0.1])
    queries = rng.normal(size=(30, dim))
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    groups = rng.integers(-1, 4, size=n_labels)  # four exclusive groups and ungrouped labels (-1)
    logits = np.hstack([queries, np.ones((30, 1))]) @ matrix.T
    everything = np.tile(np.arange(n_labels), (30, 1))  # every label a candidate: the brute force is exact
    top, scores = blend_top_k(queries, matrix, 3.0, everything, logits, None, 0.0, 8, groups)
    for i in range(30):
        expected, used = [], set()
        for label in np.argsort(-logits[i], kind="stable"):
            if groups[label] >= 0 and groups[label] in used:
                continue
            used.add(groups[label])
            expected.append(label)
        assert top[i].tolist() == expected[:8]
        np.testing.assert_allclose(scores[i], 1 / (1 + np.exp(-3.0 * logits[i, expected[:8]])), rtol=1e-6)
    # Without groups the same call ranks all labels freely, so some row has two labels of one group.
    free, _ = blend_top_k(queries, matrix, 3.0, everything, logits, None, 0.0, 8)
    assert any(np.bincount(groups[row][groups[row] >= 0]).max() > 1 for row in free)


def test_with_only_exclusive_groups_top_k_stops_at_one_label_per_group():
    matrix = np.array([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 1.0, 0.0], [0.5, 0.5, 0.0]])
    queries = np.array([[1.0, 0.0]])
    logits = np.hstack([queries, [[1.0]]]) @ matrix.T
    top, scores = blend_top_k(queries, matrix, 10.0, np.array([[0, 1, 2, 3]]), logits, None, 0.0, 4,
                              np.array([0, 0, 1, 1]))
    assert top.tolist() == [[0, 3, -1, -1]] and scores[0, 2:].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("dense_factor", [0, 10**9])  # always gather a vector per pair / always one matrix product
def test_pair_logits_are_the_same_by_either_route(monkeypatch, dense_factor):
    from xmctag.scoring import ranking

    rng = np.random.default_rng(3)
    queries = rng.standard_normal((50, 8)).astype(np.float32)
    matrix = rng.standard_normal((300, 9)).astype(np.float32)
    rows, labels = rng.integers(0, 50, 2000), rng.integers(0, 300, 2000)
    monkeypatch.setattr(ranking, "CHUNK", 512)  # several chunks
    monkeypatch.setattr(ranking, "DENSE_PAIRS_FACTOR", dense_factor)
    expected = np.einsum("nd,nd->n", queries[rows].astype(np.float64), matrix[labels, :8]) + matrix[labels, 8]
    np.testing.assert_allclose(ranking.pair_logits(queries, matrix, rows, labels), expected, rtol=1e-5, atol=1e-5)


def test_exclusive_groups_widen_the_candidates_until_top_k_is_full():
    # 200 labels: 0-59 and 60-99 are two exclusive groups whose labels all score high, 100-199 are ungrouped. The
    # first max(2k, 32) candidates are all grouped (two places), so rank_labels must search those rows again.
    from xmctag.scoring import rank_labels

    rng = np.random.default_rng(4)
    n_labels, dim, n_train, k = 200, 8, 100, 10
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    matrix = np.hstack([rng.normal(size=(n_labels, dim)) * 0.3, np.r_[np.full(100, 3.0), np.zeros(100)][:, None]])
    groups = np.r_[np.zeros(60, int), np.ones(40, int), np.full(100, -1)]
    train = unit(rng.normal(size=(n_train, dim)))
    train_labels = [rng.choice(n_labels, size=rng.integers(1, 4), replace=False) for _ in range(n_train)]
    queries = unit(rng.normal(size=(12, dim)))
    calls = []

    def search(q, n):  # exact, as faiss's index.search
        calls.append((len(q), n))
        logits = q @ matrix.T
        top = np.argsort(-logits, axis=1, kind="stable")[:, :n]
        return np.take_along_axis(logits, top, 1), top

    for weight in (0.0, 0.5):
        sims = queries @ train.T
        nn = np.argsort(-sims, axis=1)[:, :5]
        votes = NeighbourLabels.from_lists(train_labels).votes(nn, np.take_along_axis(sims, nn, 1), 10.0)
        expected = brute_force(queries, matrix, 4.0, train_labels, train, 5, 10.0, weight, k)
        top, scores = rank_labels(queries, matrix, 4.0, search, votes if weight else None, weight, k, groups)
        assert (top >= 0).all()  # k labels each: two groups + eight ungrouped ones
        for i in range(len(queries)):
            best, used = [], set()
            for label in np.argsort(-expected[i], kind="stable"):
                if groups[label] >= 0 and groups[label] in used:
                    continue
                used.add(groups[label])
                best.append(label)
            assert top[i].tolist() == best[:k]
            np.testing.assert_allclose(scores[i], expected[i, best[:k]], rtol=1e-6)
    assert calls[0] == (12, 32) and len(calls) > 1 and max(n for _, n in calls) <= n_labels  # widened, bounded
    # Without groups the first search is the only one.
    calls.clear()
    rank_labels(queries, matrix, 4.0, search, None, 0.0, k)
    assert calls == [(12, 32)]


def test_fused_blend_matches_brute_force_with_the_lexical_scores():
    """With one lexical weight for every label the fused top-k over the candidates is the brute-force top-k over
    all labels; with a weight per label band each candidate's score is still (1 - a_l) * dense + a_l * lexical."""
    rng = np.random.default_rng(2)
    n_labels, dim, n_train, n = 200, 8, 150, 25
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    matrix = np.hstack([rng.normal(size=(n_labels, dim)) * 0.3, rng.normal(size=(n_labels, 1)) * 0.1])
    train = unit(rng.normal(size=(n_train, dim)))
    train_labels = [rng.choice(n_labels, size=rng.integers(1, 6), replace=False) for _ in range(n_train)]
    queries = unit(rng.normal(size=(n, dim)))
    dense = brute_force(queries, matrix, 5.0, train_labels, train, 10, 10.0, 0.5, 5)
    lexical_top = np.array([rng.choice(n_labels, size=12, replace=False) for _ in range(n)])
    lexical_top[0, 6:] = -1  # fewer lexical candidates for this product
    lexical_scores = np.where(lexical_top >= 0, np.sort(rng.random((n, 12)), axis=1)[:, ::-1], 0.0)
    lexical_all = np.zeros((n, n_labels))
    for i in range(n):
        found = lexical_top[i] >= 0
        lexical_all[i, lexical_top[i][found]] = lexical_scores[i][found]

    lv_logits = np.hstack([queries, np.ones((n, 1))]) @ matrix.T
    candidates = np.argsort(-lv_logits, axis=1)[:, :32]
    sims = queries @ train.T
    nn = np.argsort(-sims, axis=1)[:, :10]
    votes = NeighbourLabels.from_lists(train_labels).votes(nn, np.take_along_axis(sims, nn, 1), 10.0)
    for weights in (np.full(n_labels, 0.4), rng.choice([0.2, 0.5, 0.8], size=n_labels)):
        expected = (1 - weights) * dense + weights * lexical_all
        top, scores = blend_top_k(queries, matrix, 5.0, candidates, np.take_along_axis(lv_logits, candidates, 1),
                                  votes, 0.5, 5, lexical=(lexical_top, lexical_scores, weights))
        np.testing.assert_allclose(np.take_along_axis(expected, top, 1), scores, rtol=1e-6)
        assert np.all(np.diff(scores, axis=1) <= 0)
        if np.ptp(weights) == 0:  # one weight: exact
            np.testing.assert_allclose(scores, np.sort(expected, axis=1)[:, ::-1][:, :5], rtol=1e-6)
    # A lexical weight of 0 is the dense ranking.
    plain = blend_top_k(queries, matrix, 5.0, candidates, np.take_along_axis(lv_logits, candidates, 1), votes, 0.5, 5)
    zero = blend_top_k(queries, matrix, 5.0, candidates, np.take_along_axis(lv_logits, candidates, 1), votes, 0.5, 5,
                       lexical=(lexical_top, lexical_scores, np.zeros(n_labels)))
    np.testing.assert_allclose(zero[1], plain[1], rtol=1e-9)
