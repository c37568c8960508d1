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
