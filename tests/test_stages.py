"""training stages: the classifier and dual-encoder stages keep their best dev epoch and resume after a checkpoint."""

import json

import pytest
from conftest import count_training_steps, stop_after_checkpoint

from xmctag import run_dir as layout


@pytest.mark.e2e
def test_classifier_stage_starts_from_the_label_vectors_and_lowers_its_loss(tiny_encoder_dir, catalog_dir):
    import numpy as np
    import torch

    from xmctag import Config
    from xmctag.models.build import prepare_model
    from xmctag.models.embedding import encode_ids
    from xmctag.models.registry import load_pretrained
    from xmctag.progress import Progress
    from xmctag.training.classifier import ClassifierStage
    from xmctag.training.data import TrainingData
    from xmctag.training.label_vectors import fit_label_vectors
    from xmctag.training.stage import run_epochs

    torch.manual_seed(0)
    config = Config(encoder=tiny_encoder_dir, batch_size=32, classifier_lr=1e-3, classifier_vector_lr=1e-2,
                    warmup_steps=2, max_length=16, label_max_length=12, vision="none")
    data = TrainingData.read(catalog_dir / "train.parquet", catalog_dir / "labels.parquet", None, config)
    tokenizer, encoder = prepare_model(*load_pretrained(tiny_encoder_dir), config, torch.device("cpu"))
    data.tokenize(tokenizer, config)
    vectors = fit_label_vectors(encode_ids(encoder, data.product_ids, data.pad_id), data.train.labels,
                                encode_ids(encoder, data.label_ids, data.pad_id), epochs=2)
    stage = ClassifierStage(encoder, data, vectors, config, torch.device("cpu"), save_encoder=lambda model: None)
    np.testing.assert_array_equal(stage.head().vectors, vectors.vectors)
    np.testing.assert_array_equal(stage.head().bias, vectors.bias)
    everything = np.arange(len(data.product_ids))
    with torch.no_grad():
        before = float(stage.loss(everything))
    stage.start(2)
    run_epochs(stage, None, checkpoint=lambda: None, show=Progress(False))
    with torch.no_grad():
        after = float(stage.loss(everything))
    assert [h["classifier_epoch"] for h in stage.progress.history] == [1, 2]
    assert after < 0.8 * before


# -- the output directory: --overwrite, failed runs, --resume --------------------------------------------------------
def _quick(tiny_encoder_dir, **settings):
    """The cheapest settings that still write a whole run directory."""
    from xmctag import Config

    return Config(**{**dict(encoder=tiny_encoder_dir, epochs=0, classifier_epochs=0, batch_size=32, max_length=16,
                            label_max_length=12, label_vector_epochs=1, knn_neighbours=0), **settings})


# -- the classifier stage: best epoch on dev, checkpoints and --resume ------------------------------------------------
def _classifier_config(tiny_encoder_dir):
    return _quick(tiny_encoder_dir, epochs=1, classifier_epochs=2, lr=1e-3, classifier_lr=1e-3, warmup_steps=2,
                  knn_neighbours=5)


@pytest.mark.e2e
def test_classifier_stage_keeps_its_best_epoch_on_dev(tmp_path, small_catalog_dir, tiny_encoder_dir, monkeypatch):
    import numpy as np

    import xmctag.training.stage as stage
    import xmctag.training.trainer as trainer
    from xmctag import train

    scores = iter([0.0, 1.0, 0.5])  # dual-encoder epoch 1, classifier epochs 1 and 2: the classifier's first wins
    monkeypatch.setattr(stage, "dev_score", lambda metrics: next(scores))
    evaluated = []  # (dev product embeddings, label vectors) of each dev evaluation
    evaluate = trainer.evaluate_scores
    monkeypatch.setattr(trainer, "evaluate_scores", lambda products, vectors, *args, **kwargs: (
        evaluated.append((products, vectors)), evaluate(products, vectors, *args, **kwargs))[1])
    out = tmp_path / "run"
    train(small_catalog_dir / "train.parquet", small_catalog_dir / "labels.parquet", out,
          dev=small_catalog_dir / "dev.parquet", config=_classifier_config(tiny_encoder_dir), progress=False)

    metrics = json.loads((out / layout.METRICS).read_text())
    assert [h.get("classifier_epoch") for h in metrics["history"]] == [None, 1, 2, None]
    assert (metrics["classifier_epochs"], metrics["classifier_best_epoch"]) == (2, 1)
    (_, first), (_, second), (final_products, _) = evaluated[1:4]  # classifier epochs 1 and 2, the saved model
    saved = np.load(out / layout.LABEL_VECTORS)
    np.testing.assert_array_equal(saved, first.index_matrix())
    assert not np.allclose(saved, second.index_matrix())
    # The saved encoder is epoch 1's: it embeds dev as epoch 1's evaluation did.
    np.testing.assert_allclose(final_products, evaluated[1][0], atol=1e-5)
    assert not np.allclose(final_products, evaluated[2][0], atol=1e-5)
    assert metrics["history"][-1]["dev_label_vectors"] == metrics["history"][1]["dev_head"]


@pytest.mark.e2e
def test_classifier_stage_resumes_after_its_last_checkpoint(tmp_path, small_catalog_dir, tiny_encoder_dir, monkeypatch):
    import numpy as np
    import pytest

    import xmctag.training.trainer as trainer
    from xmctag import train
    from xmctag.training.classifier import ClassifierStage
    from xmctag.training.dual_encoder import DualEncoderStage

    files = dict(train=small_catalog_dir / "train.parquet", labels=small_catalog_dir / "labels.parquet",
                 dev=small_catalog_dir / "dev.parquet", config=_classifier_config(tiny_encoder_dir), progress=False)
    with monkeypatch.context() as patch:  # interrupted after classifier epoch 1 of 2
        stop_after_checkpoint(patch, "classifier", epoch=1)
        with pytest.raises(KeyboardInterrupt):
            train(out=tmp_path / "resumed", **files)

    def not_again(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    ran = []
    train_epoch = ClassifierStage.train_epoch
    with monkeypatch.context() as patch:  # the dual encoder and the label vectors are behind the checkpoint
        patch.setattr(DualEncoderStage, "train_step", not_again)
        patch.setattr(trainer, "fit_label_vectors", not_again)
        patch.setattr(ClassifierStage, "train_epoch", lambda self, *args: ran.append(train_epoch(self, *args))
                      or ran[-1])
        train(out=tmp_path / "resumed", resume=True, **files)
    assert [r["classifier_epoch"] for r in ran] == [2]
    train(out=tmp_path / "straight", **files)

    resumed, straight = (json.loads((tmp_path / name / layout.METRICS).read_text()) for name in ("resumed", "straight"))
    assert [h.get("classifier_epoch") for h in resumed["history"]] == [None, 1, 2, None]
    assert resumed["classifier_best_epoch"] == straight["classifier_best_epoch"]
    for name in (layout.LABEL_VECTORS, layout.LABEL_EMBEDDINGS, layout.TRAIN_EMBEDDINGS):
        np.testing.assert_allclose(np.load(tmp_path / "resumed" / name), np.load(tmp_path / "straight" / name),
                                   atol=1e-5, err_msg=name)
    assert not (tmp_path / "resumed" / layout.CHECKPOINT).exists()


@pytest.mark.e2e
def test_dual_encoder_stage_resumes_after_its_last_checkpoint(tmp_path, small_catalog_dir, tiny_encoder_dir,
                                                               monkeypatch):
    # A plain encoder (no classifier stage) stopped between its two epochs, then resumed: the same run as one that
    # was never interrupted.
    import numpy as np

    from xmctag import train

    files = dict(train=small_catalog_dir / "train.parquet", labels=small_catalog_dir / "labels.parquet",
                 dev=small_catalog_dir / "dev.parquet", progress=False,
                 config=_quick(tiny_encoder_dir, epochs=2, lr=1e-3, warmup_steps=2, cluster_start_epoch=1,
                               knn_neighbours=5, label_vector_epochs=2))
    with monkeypatch.context() as patch:
        stop_after_checkpoint(patch, "dual encoder", epoch=1)
        with pytest.raises(KeyboardInterrupt):
            train(out=tmp_path / "resumed", **files)
    assert layout.run_state(tmp_path / "resumed") == "interrupted"
    with monkeypatch.context() as patch:  # only epoch 2 is trained again
        steps = count_training_steps(patch)
        train(out=tmp_path / "resumed", resume=True, **files)
    assert len(steps) == 128 // 32  # one epoch of batches
    train(out=tmp_path / "straight", **files)

    resumed, straight = (json.loads((tmp_path / name / layout.METRICS).read_text()) for name in ("resumed", "straight"))
    assert [h.get("epoch") for h in resumed["history"]] == [1, 2, None]
    assert resumed["best_epoch"] == straight["best_epoch"]
    for a, b in zip(resumed["history"], straight["history"]):
        for key in ("loss", "dev"):
            if key in a:
                assert a[key] == pytest.approx(b[key], abs=1e-5), key
    assert resumed["dev"] == pytest.approx(straight["dev"], abs=1e-5)
    for name in (layout.LABEL_VECTORS, layout.LABEL_EMBEDDINGS, layout.TRAIN_EMBEDDINGS):
        np.testing.assert_allclose(np.load(tmp_path / "resumed" / name), np.load(tmp_path / "straight" / name),
                                   atol=1e-5, err_msg=name)
    assert not (tmp_path / "resumed" / layout.CHECKPOINT).exists()


@pytest.mark.e2e
def test_dual_encoder_keeps_its_best_epoch_on_dev(tmp_path, small_catalog_dir, tiny_encoder_dir, monkeypatch):
    import numpy as np

    import xmctag.training.stage as stage
    import xmctag.training.trainer as trainer
    from xmctag import train

    scores = iter([1.0, 0.5])  # epoch 1 beats epoch 2 on dev
    monkeypatch.setattr(stage, "dev_score", lambda metrics: next(scores))
    evaluated = []  # dev product embeddings of each dev evaluation
    evaluate = trainer.evaluate_scores
    monkeypatch.setattr(trainer, "evaluate_scores", lambda products, vectors, *args, **kwargs: (
        evaluated.append(products), evaluate(products, vectors, *args, **kwargs))[1])
    out = tmp_path / "run"
    train(small_catalog_dir / "train.parquet", small_catalog_dir / "labels.parquet", out,
          dev=small_catalog_dir / "dev.parquet",
          config=_quick(tiny_encoder_dir, epochs=2, classifier_epochs=0, lr=1e-3, warmup_steps=2), progress=False)

    assert json.loads((out / layout.METRICS).read_text())["best_epoch"] == 1
    epoch_1, epoch_2, final = evaluated[:3]  # after epochs 1 and 2, then the saved model
    np.testing.assert_allclose(final, epoch_1, atol=1e-5)  # the saved encoder is epoch 1's
    assert not np.allclose(final, epoch_2, atol=1e-5)
