"""Training: the run directory, learning on the synthetic catalog, resume and config checks."""

import json
import re

import pytest
from conftest import count_training_steps, stop_after_checkpoint

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


@pytest.mark.e2e
def test_auto_epochs_follow_the_time_budget(small_catalog_dir, tiny_encoder_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    from xmctag import Config, train

    def run(name, **settings):
        config = Config(encoder=tiny_encoder_dir, epochs="auto", batch_size=32, max_length=16, label_max_length=12,
                        label_vector_epochs=2, knn_neighbours=0, **settings)
        train(small_catalog_dir / "train.parquet", small_catalog_dir / "labels.parquet", tmp_path / name, config=config,
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


# -- the output directory: --overwrite, failed runs, --resume --------------------------------------------------------
def _quick(tiny_encoder_dir, **settings):
    """The cheapest settings that still write a whole run directory."""
    from xmctag import Config

    return Config(**{**dict(encoder=tiny_encoder_dir, epochs=0, classifier_epochs=0, batch_size=32, max_length=16,
                            label_max_length=12, label_vector_epochs=1, knn_neighbours=0), **settings})


@pytest.mark.e2e
def test_overwrite_replaces_only_a_run_directory(tmp_path, small_catalog_dir, tiny_encoder_dir):
    import shutil

    import pytest

    from xmctag import UserError, train

    config = _quick(tiny_encoder_dir)
    # A folder holding the input catalogs (here: also other files) is never deleted.
    data = tmp_path / "data"
    shutil.copytree(small_catalog_dir, data)
    with pytest.raises(UserError, match=f"--out {data}: holds --train .*train.parquet and --labels"):
        train(data / "train.parquet", data / "labels.parquet", data, config=config, overwrite=True, progress=False)
    # Nor any directory with files a run does not write (a home directory, a project).
    home = tmp_path / "home"
    (home / "projects").mkdir(parents=True)
    (home / "notes.txt").write_text("mine")
    (home / layout.CONFIG).write_text(json.dumps({"editor": "vim"}))
    with pytest.raises(UserError, match=f"--out {home}: not an xmctag run directory"):
        train(small_catalog_dir / "train.parquet", small_catalog_dir / "labels.parquet", home, config=config,
              overwrite=True, progress=False)
    assert sorted(p.name for p in data.iterdir()) == sorted(p.name for p in small_catalog_dir.iterdir())
    assert sorted(p.name for p in home.iterdir()) == [layout.CONFIG, "notes.txt", "projects"]

    # A run directory is replaced, its image cache kept (valid for any run); an input inside it is refused.
    run = tmp_path / "run"
    (run / layout.IMAGE_CACHE).mkdir(parents=True)
    (run / layout.IMAGE_CACHE / "shard").write_text("embeddings")
    config.save(run / layout.CONFIG)
    (run / layout.FUSION).write_text("{}")  # stale: the new run is text only
    shutil.copy(small_catalog_dir / "labels.parquet", run / layout.LABELS)
    with pytest.raises(UserError, match="holds --labels"):
        train(small_catalog_dir / "train.parquet", run / layout.LABELS, run, config=config, overwrite=True,
              progress=False)
    train(small_catalog_dir / "train.parquet", small_catalog_dir / "labels.parquet", run, config=config,
          overwrite=True, progress=False)
    assert not (run / layout.FUSION).exists() and (run / layout.IMAGE_CACHE / "shard").exists()
    layout.load_run(run)


@pytest.mark.e2e
def test_a_failed_run_does_not_block_the_rerun(tmp_path, small_catalog_dir, tiny_encoder_dir, monkeypatch):
    import polars as pl
    import pytest

    from xmctag import UserError, train
    from xmctag.training.dual_encoder import DualEncoderStage

    config, out = _quick(tiny_encoder_dir, epochs=1), tmp_path / "run"
    files = dict(train=small_catalog_dir / "train.parquet", out=out, config=config, progress=False)
    bad = tmp_path / "labels.parquet"
    pl.read_parquet(small_catalog_dir / "labels.parquet").rename({"text": "name"}).write_parquet(bad)
    with pytest.raises(UserError, match="missing column"):
        train(labels=bad, **files)
    assert not out.exists()  # the inputs are checked before anything is written

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:  # stopped during epoch 1: before the first checkpoint
        patch.setattr(DualEncoderStage, "train_step", stop)
        with pytest.raises(KeyboardInterrupt):
            train(labels=small_catalog_dir / "labels.parquet", **files)
    assert layout.run_state(out) == "started"
    train(labels=small_catalog_dir / "labels.parquet", **files)  # the same command, no --overwrite
    assert layout.run_state(out) == "finished"


def test_resume_refuses_a_finished_run(trained_run, copy_of):
    import pytest

    from xmctag import Config, UserError, train

    run = copy_of(trained_run)
    config = Config.load(run / layout.CONFIG)
    files = dict(train=run / "x.parquet", labels=run / "y.parquet", out=run, config=config, progress=False)
    with pytest.raises(UserError, match=r"run already finished \(2 epoch\(s\) \+ 1 classifier epoch\(s\)\); "
                                        "--resume only continues an interrupted run"):
        train(resume=True, **files)
    config.epochs = 3  # nor is it trained longer
    with pytest.raises(UserError, match="run already finished"):
        train(resume=True, **files)
    with pytest.raises(UserError, match="not empty: it holds a finished run"):
        train(**files)
    assert layout.run_state(run) == "finished"


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
    monkeypatch.setattr(trainer, "evaluate_scores", lambda products, vectors, *args: (
        evaluated.append((products, vectors)), evaluate(products, vectors, *args))[1])
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
    monkeypatch.setattr(trainer, "evaluate_scores", lambda products, vectors, *args: (
        evaluated.append(products), evaluate(products, vectors, *args))[1])
    out = tmp_path / "run"
    train(small_catalog_dir / "train.parquet", small_catalog_dir / "labels.parquet", out,
          dev=small_catalog_dir / "dev.parquet",
          config=_quick(tiny_encoder_dir, epochs=2, classifier_epochs=0, lr=1e-3, warmup_steps=2), progress=False)

    assert json.loads((out / layout.METRICS).read_text())["best_epoch"] == 1
    epoch_1, epoch_2, final = evaluated[:3]  # after epochs 1 and 2, then the saved model
    np.testing.assert_allclose(final, epoch_1, atol=1e-5)  # the saved encoder is epoch 1's
    assert not np.allclose(final, epoch_2, atol=1e-5)


# -- settings checked against the model and the data, before anything is written --------------------------------------
def _with_image_column(catalog_dir, tmp_path):
    """The training catalog with an (empty) image column: training then plans image tokens."""
    import polars as pl

    path = tmp_path / "with-images.parquet"
    pl.read_parquet(catalog_dir / "train.parquet").with_columns(pl.lit(None, pl.String).alias("image")) \
        .write_parquet(path)
    return path


@pytest.mark.e2e
def test_lengths_beyond_the_models_positions_are_refused_before_writing(tmp_path, catalog_dir, tiny_encoder_dir):
    import pytest

    from xmctag import UserError, train

    out = tmp_path / "run"
    files = dict(labels=catalog_dir / "labels.parquet", out=out, progress=False)
    # The tiny BERT has 128 position embeddings (ONNX Runtime would fail on the first longer title when tagging).
    for settings, message in [
        (dict(max_length=256), r"max_length 256 is more than the 128 positions of .*tiny-bert.* "
                               r"\(max_position_embeddings 128\); set max_length to at most 128"),
        (dict(label_max_length=129), "label_max_length 129 is more than the 128 positions"),
    ]:
        with pytest.raises(UserError, match=message):
            train(catalog_dir / "train.parquet", config=_quick(tiny_encoder_dir, **settings), **files)
    # Each image slot is one more position (the check comes before the vision model is even loaded).
    with pytest.raises(UserError, match=r"max_length 127 \+ 2 image token\(s\) is more than the 128 positions .*; "
                                        "set max_length to at most 126"):
        train(_with_image_column(catalog_dir, tmp_path), config=_quick(
            tiny_encoder_dir, max_length=127, max_images=2, vision="some/vision-model"), **files)
    assert not out.exists()
    train(catalog_dir / "train.parquet", config=_quick(tiny_encoder_dir, max_length=128, label_max_length=128),
          **files)  # the limit itself fits


def test_an_unusable_cache_dir_is_refused_before_writing(tmp_path, catalog_dir, tiny_encoder_dir):
    import pytest

    from xmctag import UserError, train

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out = tmp_path / "run"
    for cache, message in [(blocker, f"--cache-dir {blocker}: not a directory"),
                           (blocker / "cache", f"--cache-dir {blocker / 'cache'}: cannot create it ({blocker} is "
                                               "not a directory)")]:
        config = _quick(tiny_encoder_dir, vision="some/vision-model", image_cache_dir=str(cache))
        with pytest.raises(UserError, match=re.escape(message)):
            train(_with_image_column(catalog_dir, tmp_path), catalog_dir / "labels.parquet", out, config=config,
                  progress=False)
    assert not out.exists()


def test_a_ranking_needs_two_labels(tmp_path, catalog_dir, tiny_encoder_dir):
    import polars as pl
    import pytest

    from xmctag import UserError, train

    out = tmp_path / "run"
    one = tmp_path / "one.parquet"
    pl.DataFrame({"label": ["colour:red"], "text": ["colour: red"]}).write_parquet(one)
    with pytest.raises(UserError, match="one.parquet: the label table has 1 label; a ranking needs at least 2"):
        train(catalog_dir / "train.parquet", one, out, config=_quick(tiny_encoder_dir), progress=False)
    # Two labels, but the training rows know only one of them: the loss would be 0 all the same.
    two = tmp_path / "two.parquet"
    pl.DataFrame({"label": ["colour:red", "colour:teal"], "text": ["red", "teal"]}).write_parquet(two)
    with pytest.raises(UserError, match="every training row carries the one label 'colour:red'"):
        train(catalog_dir / "train.parquet", two, out, config=_quick(tiny_encoder_dir), progress=False)
    assert not out.exists()
