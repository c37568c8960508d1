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
    assert len(metrics["history"]) == 3 and metrics["history"][0]["epoch"] == 1


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
