"""Training: the run directory, learning on the synthetic catalog, resume and config checks."""

import json

from xmctag import run_dir as layout


def test_run_directory_is_self_contained(trained_run):
    for name in (layout.CONFIG, layout.MODEL, layout.LABELS, layout.LABEL_EMBEDDINGS, layout.LABEL_VECTORS,
                 layout.METRICS, layout.CARD):
        assert (trained_run / name).exists(), name
    assert not (trained_run / layout.CHECKPOINT).exists()
    assert list((trained_run / layout.MODEL).glob("*.safetensors"))
    run = layout.load_run(trained_run)
    assert run.config.epochs == 2
    assert run.vectors.vectors.shape == run.label_embeddings.shape == (19, 32)
    assert run.train_counts.sum() == 800  # 400 rows, 2 labels each


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


def test_classifier_stage_starts_from_the_label_vectors_and_lowers_its_loss(tiny_encoder_dir, catalog_dir):
    import numpy as np
    import torch

    from xmctag import Config
    from xmctag.data import LabelTable, load_labelled_set
    from xmctag.models.decoder import prepare_model
    from xmctag.models.embedding import encode_ids
    from xmctag.models.registry import load_pretrained
    from xmctag.models.tokens import pad_id_of, token_ids
    from xmctag.progress import Progress
    from xmctag.training.classifier import ClassifierStage
    from xmctag.training.label_vectors import fit_label_vectors

    torch.manual_seed(0)
    config = Config(encoder=tiny_encoder_dir, batch_size=32, classifier_lr=1e-3, classifier_vector_lr=1e-2,
                    warmup_steps=2)
    labels = LabelTable.load(catalog_dir / "labels.parquet", config)
    data = load_labelled_set(catalog_dir / "train.parquet", config, labels)
    tokenizer, encoder = prepare_model(*load_pretrained(tiny_encoder_dir), config, torch.device("cpu"))
    ids, pad_id = token_ids(tokenizer, data.texts, 16), pad_id_of(tokenizer)
    vectors = fit_label_vectors(encode_ids(encoder, ids, pad_id), data.labels,
                                encode_ids(encoder, token_ids(tokenizer, labels.texts, 12), pad_id), epochs=2)
    stage = ClassifierStage(encoder, ids, data.labels, vectors, pad_id, torch.device("cpu"), config)
    np.testing.assert_array_equal(stage.head().vectors, vectors.vectors)
    np.testing.assert_array_equal(stage.head().bias, vectors.bias)
    everything = np.arange(len(ids))
    with torch.no_grad():
        before = float(stage._loss(everything))
    history = stage.run(2, Progress(False))
    with torch.no_grad():
        after = float(stage._loss(everything))
    assert [h["classifier_epoch"] for h in history] == [1, 2]
    assert after < 0.8 * before


def test_auto_epochs_follow_the_time_budget(catalog_dir, tiny_encoder_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    from xmctag import Config, train

    def run(name, **settings):
        config = Config(encoder=tiny_encoder_dir, epochs="auto", batch_size=32, max_length=16, label_max_length=12,
                        label_vector_epochs=2, knn_neighbours=0, **settings)
        train(catalog_dir / "train.parquet", catalog_dir / "labels.parquet", tmp_path / name, config=config,
              progress=False)
        return json.loads((tmp_path / name / layout.METRICS).read_text())

    # A budget no epoch fits in: no fine-tuning, and the timing probe leaves the pretrained weights untouched.
    assert run("tight", time_budget_minutes=1e-6)["epochs"] == 0
    saved = load_file(next((tmp_path / "tight" / layout.MODEL).glob("*.safetensors")))
    pretrained = load_file(next(__import__("pathlib").Path(tiny_encoder_dir).glob("*.safetensors")))
    assert all(torch.equal(saved[k], pretrained[k]) for k in pretrained)
    assert not (tmp_path / "tight" / layout.TRAIN_EMBEDDINGS).exists()  # knn_neighbours=0: no neighbour files
    # No limit: the maximum.
    assert run("free", time_budget_minutes=0, auto_max_epochs=1)["epochs"] == 1
    # No share of the budget for the dual encoder: the classifier stage gets all of it.
    split = run("classifier-only", time_budget_minutes=5, auto_max_epochs=1, dual_encoder_budget_share=0.0)
    assert (split["epochs"], split["classifier_epochs"]) == (0, 1)
