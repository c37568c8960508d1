"""training/shortlist: per-batch targets, shortlists that estimate the one-vs-all loss, and the stages that use them
above ``label_shortlist_above`` labels; bounded dev search; train's memory estimate."""

import dataclasses

import numpy as np
import pytest
import torch

from xmctag.training.label_vectors import fit_label_vectors
from xmctag.training.shortlist import LabelLists, Shortlist, batch_targets, sampled_bce


def _problem(n=600, labels=60, dim=16, seed=0):
    """Unit-norm products near the text embedding of each of their 1-3 labels."""
    rng = np.random.default_rng(seed)
    e = rng.normal(size=(labels, dim)).astype(np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    y = [rng.choice(labels - 5, size=rng.integers(1, 4), replace=False) for _ in range(n)]  # 5 labels never seen
    x = np.stack([e[row].sum(axis=0) + 0.8 * rng.normal(size=dim) for row in y]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, y, e


def test_batch_targets_are_the_rows_of_the_dense_target_matrix():
    _, y, e = _problem()
    lists = LabelLists.build(y, np.arange(len(e)), "cpu")
    dense = np.zeros((len(y), len(e)), np.float32)
    for i, row in enumerate(y):
        dense[i, row] = 1
    rows = torch.tensor([5, 0, 599, 5, 17])
    np.testing.assert_array_equal(batch_targets(lists, rows, len(e)).numpy(), dense[rows.numpy()])
    padded = lists.padded(rows).numpy()
    for slot, i in enumerate(rows.numpy()):
        assert sorted(padded[slot][padded[slot] >= 0]) == sorted(y[i])


def test_a_shortlist_holds_each_positive_once_and_its_weights_stand_for_every_label():
    x, y, e = _problem()
    lists = LabelLists.build(y, np.arange(len(e)), "cpu")
    shortlist = Shortlist.build(x, e, lists, size=8, n_random=20, seed=0, device="cpu")
    rows = torch.arange(64)
    batch = shortlist.candidates(rows)
    columns, weight, targets = batch.columns.numpy(), batch.weight.numpy(), batch.targets.numpy()
    for slot, i in enumerate(rows.numpy()):
        counted = columns[slot][weight[slot] > 0]
        assert len(counted) == len(set(counted))  # each label once
        assert set(columns[slot][(weight[slot] > 0) & (targets[slot] == 1)]) == set(y[i])
        assert not set(counted[targets[slot][weight[slot] > 0] == 0]) & set(y[i])
        known = np.isin(batch.random.numpy(), counted)
        np.testing.assert_array_equal(batch.random_weight[slot].numpy()[known], 0)
        np.testing.assert_allclose(batch.random_weight[slot].numpy()[~known], len(e) / 20)
    # Candidates and random stand-ins count every label once, on average over the draws.
    totals = [(b.weight.sum(1) + b.random_weight.sum(1)).numpy()
              for b in (shortlist.candidates(rows) for _ in range(400))]
    np.testing.assert_allclose(np.mean(totals, axis=0), len(e), rtol=0.06)


def test_the_sampled_loss_estimates_the_one_vs_all_loss_without_bias():
    x, y, e = _problem(n=64, labels=400)
    lists = LabelLists.build(y, np.arange(len(e)), "cpu")
    shortlist = Shortlist.build(x, e, lists, size=16, n_random=32, seed=0, device="cpu")
    rows = torch.arange(64)
    logits_all = 8 * torch.from_numpy(x @ e.T) - 3
    exact = torch.nn.functional.binary_cross_entropy_with_logits(
        logits_all, batch_targets(lists, rows, len(e)), reduction="sum") / 64
    estimates = []
    for _ in range(300):
        batch = shortlist.candidates(rows)
        columns = batch.columns.clamp(min=0)
        estimates.append(float(sampled_bce(torch.gather(logits_all, 1, columns), logits_all[:, batch.random],
                                           batch)))
    assert np.mean(estimates) == pytest.approx(float(exact), rel=0.01)


def test_label_vectors_on_a_shortlist_learn_about_as_well_as_on_all_labels():
    x, y, e = _problem(n=1500, labels=120)

    def p_at_1(vectors):
        scores = x @ vectors.vectors.T + vectors.bias
        return np.mean([scores[i].argmax() in y[i] for i in range(len(y))])

    text = np.mean([(x @ e.T)[i].argmax() in y[i] for i in range(len(y))])
    dense = fit_label_vectors(x, y, e, epochs=8, batch_size=128)
    short = fit_label_vectors(x, y, e, epochs=8, batch_size=128, shortlist_above=50, shortlist_size=16,
                              random_negatives=32, shortlist_batch_size=128)
    assert p_at_1(dense) > text + 0.05
    assert p_at_1(short) > text + 0.05
    assert p_at_1(short) > p_at_1(dense) - 0.05
    # Calibrated against all labels, not only the hard ones: its mean bias stays close to the dense fit's.
    assert abs(short.bias.mean() - dense.bias.mean()) < 0.05
    # Unseen labels keep their calibrated text vectors in both.
    unseen = np.arange(115, 120)
    np.testing.assert_allclose(short.vectors[unseen] / np.linalg.norm(short.vectors[unseen], axis=1, keepdims=True),
                               e[unseen], atol=1e-5)


def test_dense_label_vectors_do_not_depend_on_the_shortlist_setting():
    x, y, e = _problem(n=300)
    a = fit_label_vectors(x, y, e, epochs=2, batch_size=64)
    b = fit_label_vectors(x, y, e, epochs=2, batch_size=64, shortlist_above=10_000)
    np.testing.assert_array_equal(a.vectors, b.vectors)
    np.testing.assert_array_equal(a.bias, b.bias)


def test_exact_search_in_small_chunks_finds_what_one_block_finds(monkeypatch):
    from xmctag.evaluation import evaluator

    rng = np.random.default_rng(0)
    queries, matrix = rng.normal(size=(300, 8)).astype(np.float32), rng.normal(size=(500, 8)).astype(np.float32)
    expected = np.argsort(-(queries @ matrix.T), axis=1)[:, :7]
    monkeypatch.setattr(evaluator, "SEARCH_BYTES", 4 * 500 * 70)  # 70 rows a block: clamped to 64
    scores, indices = evaluator.exact_search(queries, matrix, 7)
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ matrix.T, expected, axis=1), rtol=1e-5)
    read_only = matrix.copy()
    read_only.flags.writeable = False
    np.testing.assert_array_equal(evaluator.exact_search(queries, read_only, 7)[1], expected)


@pytest.mark.e2e
def test_the_classifier_stage_on_a_shortlist_lowers_the_loss_over_all_labels(tiny_encoder_dir, catalog_dir):
    from xmctag import Config
    from xmctag.models.build import prepare_model
    from xmctag.models.embedding import encode_ids
    from xmctag.models.registry import load_pretrained
    from xmctag.progress import Progress
    from xmctag.training.classifier import ClassifierStage
    from xmctag.training.data import TrainingData
    from xmctag.training.stage import run_epochs

    torch.manual_seed(0)
    config = Config(encoder=tiny_encoder_dir, batch_size=32, classifier_lr=1e-3, classifier_vector_lr=1e-2,
                    warmup_steps=2, max_length=16, label_max_length=12, vision="none", label_shortlist_above=0,
                    label_shortlist=8, label_random_negatives=8)
    data = TrainingData.read(catalog_dir / "train.parquet", catalog_dir / "labels.parquet", None, config)
    tokenizer, encoder = prepare_model(*load_pretrained(tiny_encoder_dir), config, torch.device("cpu"))
    data.tokenize(tokenizer, config)
    products = encode_ids(encoder, data.product_ids, data.pad_id)
    vectors = fit_label_vectors(products, data.train.labels, encode_ids(encoder, data.label_ids, data.pad_id),
                                epochs=2)
    stage = ClassifierStage(encoder, data, vectors, config, torch.device("cpu"), lambda model: None, products)
    assert stage.shortlist is not None and stage.shortlist.hard.shape == (len(products), 8)
    full = ClassifierStage(encoder, data, vectors, dataclasses.replace(config, label_shortlist_above=10**6),
                           torch.device("cpu"), lambda model: None, products)
    everything = np.arange(len(data.product_ids))
    with torch.no_grad():
        before = float(full.loss(everything))
    stage.start(2)
    run_epochs(stage, None, checkpoint=lambda: None, show=Progress(False))
    full.head_w.data.copy_(stage.head_w.data)
    full.head_b.data.copy_(stage.head_b.data)
    with torch.no_grad():
        after = float(full.loss(everything))  # the exact one-vs-all loss, over every label
    assert after < 0.8 * before
    state = stage.state()
    np.testing.assert_array_equal(state["shortlist"], stage.shortlist.hard.numpy())


def test_row_adam_is_adam_on_the_rows_a_step_touches():
    from xmctag.training.shortlist import RowAdam

    torch.manual_seed(0)
    target = torch.randn(6, 3)
    table, reference = torch.zeros(6, 3), torch.zeros(6, 3, requires_grad=True)
    rows_adam, adam = RowAdam(table, 0.1), torch.optim.Adam([reference], lr=0.1)
    for _ in range(5):  # every row touched: exactly Adam
        leaf = rows_adam.rows(torch.arange(6))
        (leaf - target).square().sum().backward()
        rows_adam.step()
        adam.zero_grad()
        (reference - target).square().sum().backward()
        adam.step()
    torch.testing.assert_close(table, reference.detach())
    before = table.clone()
    leaf = rows_adam.rows(torch.tensor([1, 4]))  # only rows 1 and 4: the others and their moments wait
    (leaf - target[[1, 4]]).square().sum().backward()
    rows_adam.step()
    untouched = [0, 2, 3, 5]
    torch.testing.assert_close(table[untouched], before[untouched])
    assert not torch.equal(table[[1, 4]], before[[1, 4]])
