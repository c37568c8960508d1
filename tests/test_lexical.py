"""xmctag.lexical and training/lexical: TF-IDF features and label trees saved without pickle and loaded to the same
predictions, the fusion weights fitted to what each side gets right, and the lexical part of a bundle checked."""

import json

import numpy as np
import pytest
from conftest import ARTICLES, COLOURS, make_catalog

from xmctag import Config, Tagger, UserError
from xmctag.lexical import LexicalModel, label_weights
from xmctag.lexical.features import TfidfFeatures
from xmctag.manifest import seal
from xmctag.scoring.ranking import candidate_table
from xmctag.training.lexical import fit_fusion, holdout_rows, train_lexical

LABELS = [f"colour:{c}" for c in COLOURS] + [f"article:{a}" for a in ARTICLES]


def catalog(n: int, seed: int):
    frame = make_catalog(n, seed)
    index = {label: i for i, label in enumerate(LABELS)}
    return frame["title"].to_list(), [np.array([index[x] for x in row]) for row in frame["labels"].to_list()]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return tmp_path_factory.mktemp("run") / "lexical"


@pytest.fixture(scope="module")
def model(model_folder):
    texts, labels = catalog(400, 0)
    return train_lexical(texts, labels, len(LABELS), Config(lexical_candidates=8), model_folder)


def test_features_save_and_load_to_the_same_matrix(tmp_path):
    texts, _ = catalog(200, 1)
    features = TfidfFeatures.fit(texts, min_df=2)
    features.save(tmp_path)
    again = TfidfFeatures.load(tmp_path)
    queries = ["acme red shirt", "a title with words never seen", "", "RED SHIRT red shirt"]
    a, b = features.transform(queries), again.transform(queries)
    assert a.shape == b.shape == (4, features.n_features) and (a != b).nnz == 0
    norms = np.sqrt(np.asarray(a.multiply(a).sum(axis=1)).ravel())
    np.testing.assert_allclose(norms[[0, 3]], 1.0, rtol=1e-5)  # rows are unit-norm; an empty text is an empty row
    assert a[2].nnz == 0
    assert not any(p.suffix in (".pkl", ".pickle", ".joblib") for p in tmp_path.iterdir())


def test_label_trees_learn_the_catalog_and_reload_to_the_same_predictions(model, model_folder):
    texts, truth = catalog(100, 7)
    top, scores = model.predict(texts)
    assert top.shape == scores.shape == (100, 8)
    assert np.all((scores >= 0) & (scores <= 1)) and np.all(np.diff(scores, axis=1) <= 1e-7)
    hits = np.mean([set(top[i, :2]) == set(truth[i]) for i in range(100)])
    assert hits > 0.9  # colour and article are in the title: the trees find both
    again = LexicalModel.load(model_folder)  # what a bundle's copy of the folder loads
    top2, scores2 = again.predict(texts)
    np.testing.assert_array_equal(top, top2)
    np.testing.assert_array_equal(scores, scores2)
    assert model.predict(["zzzz qqqq"])[0].shape == (1, 8)  # no known term: no candidates (-1), no error


def test_a_lexical_folder_that_is_not_xmctags_is_refused(model, tmp_path):
    model.save(tmp_path / "lexical")
    spec = json.loads((tmp_path / "lexical" / "lexical.json").read_text())
    (tmp_path / "lexical" / "lexical.json").write_text(json.dumps({**spec, "format": "other/1"}))
    with pytest.raises(ValueError, match="xmctag-lexical/1"):
        LexicalModel.load(tmp_path / "lexical")
    (tmp_path / "lexical" / "lexical.json").write_text(json.dumps({**spec, "n_features": 3}))
    with pytest.raises(ValueError, match="features"):
        LexicalModel.load(tmp_path / "lexical")


def test_band_weights_follow_the_training_counts():
    fusion = {"bands": [5, 50], "weights": [0.9, 0.5, 0.1]}
    np.testing.assert_array_equal(label_weights(fusion, np.array([0, 5, 6, 50, 51, 10_000])),
                                  [0.9, 0.9, 0.5, 0.5, 0.1, 0.1])


def _table(n, n_labels, truth, dense_right: bool, lexical_right: bool):
    """Candidates where the dense side ranks the truth first (or a wrong label), and the lexical side likewise."""
    wrong = [(t[0] + 1) % n_labels for t in truth]
    dense_top = np.array([[t[0], w] if dense_right else [w, t[0]] for t, w in zip(truth, wrong)])
    queries = np.zeros((n, n_labels), dtype=np.float32)  # label vectors e_l, bias 0: logit = the query's entry
    queries[np.arange(n), dense_top[:, 0]], queries[np.arange(n), dense_top[:, 1]] = 2.0, 0.5
    matrix = np.hstack([np.eye(n_labels), np.zeros((n_labels, 1))]).astype(np.float32)
    lexical_top = np.array([[t[0], w] if lexical_right else [w, t[0]] for t, w in zip(truth, wrong)])
    lexical_scores = np.array([[0.9, 0.2]] * n)
    return candidate_table(queries, matrix, 1.0, dense_top, np.array([[2.0, 0.5]] * n), None, 0.0,
                           (lexical_top, lexical_scores))


@pytest.mark.parametrize("dense_right, lexical_right, expect", [(True, False, "low"), (False, True, "high")])
def test_fusion_weights_go_to_the_side_that_is_right(dense_right, lexical_right, expect):
    n, n_labels = 60, 10
    truth = [np.array([i % n_labels]) for i in range(n)]
    table = _table(n, n_labels, truth, dense_right, lexical_right)
    counts = np.full(n_labels, 20)
    fusion = fit_fusion(table, truth, np.ones(n_labels), counts, Config(eval_ks=[1]), "dev")
    assert fusion["fitted_on"] == "dev" and fusion["bands"] == [5, 50]
    used = fusion["weights"][1]  # every label is in the 6-50 band
    # The right side ranks the truth first for a < 0.27 (dense right) or a > 0.27 (lexical right): a weight there,
    # among equals the one nearest 0.5.
    assert used == (0.25 if expect == "low" else 0.5)
    assert fusion["value"] == pytest.approx(2.0)  # P@1 + PSP@1 (eval_ks [1]), both perfect


def test_holdout_rows_are_a_reproducible_slice():
    rows = holdout_rows(1000, seed=3)
    assert len(rows) == 100 and np.all(np.diff(rows) > 0)
    np.testing.assert_array_equal(rows, holdout_rows(1000, seed=3))
    assert len(holdout_rows(5, seed=0)) == 0


def test_the_bundle_lexical_section_is_checked(tiny_bundle, copy_of):
    bundle = copy_of(tiny_bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["lexical"]["folder"] == "lexical" and len(manifest["lexical"]["weights"]) == 3
    assert any(name.startswith("lexical/trees/") for name in manifest["files"])
    tagger = Tagger.load(bundle, device="cpu")
    assert tagger.lexical is not None and tagger.lexical_weights.shape == (len(tagger.label_ids),)
    # A resealed manifest whose weights differ from the lexical model's own: refused.
    seal(bundle, {**manifest, "lexical": {**manifest["lexical"], "weights": [0.0, 0.0, 0.0]}})
    with pytest.raises(UserError, match="lexical model's fusion weights"):
        Tagger.load(bundle, device="cpu")
    seal(bundle, {**manifest, "lexical": {**manifest["lexical"], "weights": [2.0, 0.0, 0.0]}})
    with pytest.raises(UserError, match="lexical.weights"):
        Tagger.load(bundle, device="cpu")


def test_a_damaged_lexical_model_is_a_one_line_error(tiny_bundle, copy_of):
    bundle = copy_of(tiny_bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    (bundle / "lexical" / "features.json").write_text("{ not json")
    seal(bundle, manifest)
    with pytest.raises(UserError, match="lexical.*unreadable.*re-export"):
        Tagger.load(bundle, device="cpu")
