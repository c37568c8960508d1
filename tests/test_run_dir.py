"""run_dir: a self-contained run directory, overwrite, resume, a failed run that does not block the rerun."""

import json

import pytest

from xmctag import Config, UserError, train
from xmctag import run_dir as layout


@pytest.mark.e2e
def test_resume_continues_and_refuses_changed_settings(tmp_path, small_catalog_dir, tiny_encoder_dir, monkeypatch):
    import xmctag.training.trainer as trainer

    config = Config(encoder=tiny_encoder_dir, epochs=1, classifier_epochs=0, batch_size=32, lr=1e-3, warmup_steps=2,
                    max_length=16, label_max_length=12, label_vector_epochs=2)
    files = dict(train=small_catalog_dir / "train.parquet", labels=small_catalog_dir / "labels.parquet",
                 out=tmp_path / "run", progress=False)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:  # stop the run after its first epoch
        patch.setattr(trainer, "fit_label_vectors", interrupted)
        with pytest.raises(KeyboardInterrupt):
            train(config=config, **files)
    assert (tmp_path / "run/checkpoint.safetensors").exists()
    with pytest.raises(UserError, match="lr 0.001 -> 0.5"):
        train(config=Config(**{**config.to_dict(), "lr": 0.5}), resume=True, **files)
    config.epochs = 2  # training longer is the one allowed change
    result = train(config=config, resume=True, **files)
    assert [h.get("epoch") for h in result.history] == [1, 2, None]  # epoch 1 came from the checkpoint
    assert not (tmp_path / "run/checkpoint.safetensors").exists()


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
