"""train(): learning the synthetic catalog end to end; the classifier head becomes the label vectors."""

import json

from xmctag import run_dir as layout


def test_training_learns_the_synthetic_catalog(trained_run):
    metrics = json.loads((trained_run / layout.METRICS).read_text())
    assert metrics["dev"]["P@1"] > 0.9
    assert metrics["dev"]["P@3"] > 0.6  # 2 true labels per row: P@3 is at most 2/3
    assert [h.get("epoch") or h.get("classifier_epoch") for h in metrics["history"]] == [1, 2, 1, None]


def test_classifier_stage_head_becomes_the_label_vectors(trained_run):
    # The fixture ran one classifier epoch: its head, evaluated on dev right after the epoch, and the saved label
    # vectors, evaluated on dev with the saved (fine-tuned) encoder, are the same model: identical metrics.
    metrics = json.loads((trained_run / layout.METRICS).read_text())
    history = metrics["history"]
    assert history[2]["dev_head"] == history[3]["dev_label_vectors"]
    assert history[2]["loss"] > 0 and "seconds" in history[2]
    assert metrics["classifier_epochs"] == 1
    assert "Classifier stage: 1 epoch(s) (setting: 1)" in (trained_run / layout.CARD).read_text()


def test_the_run_records_the_dense_lexical_and_fused_dev_metrics(trained_run):
    import numpy as np

    from xmctag.lexical import LexicalModel

    metrics = json.loads((trained_run / layout.METRICS).read_text())
    final = metrics["history"][-1]
    assert final["dev"] == metrics["dev"] and final["lexical_seconds"] > 0
    assert set(final["dev_dense"]) == set(final["dev_lexical"]) == set(final["dev"])
    model = LexicalModel.load(trained_run / layout.LEXICAL)
    assert model.fusion["fitted_on"] == "dev" and len(model.fusion["weights"]) == 3
    assert all(0 <= w <= 1 for w in model.fusion["weights"])
    # The fit maximises P@1 + P@5 + PSP@5 over weights that include 0 (dense alone) and 1 (lexical alone).
    value = sum(final["dev"][k] for k in ("P@1", "P@5", "PSP@5"))
    assert value >= sum(final["dev_dense"][k] for k in ("P@1", "P@5", "PSP@5")) - 1e-9
    assert np.isclose(model.fusion["value"], value)
