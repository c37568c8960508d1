"""training/settings and budget: what is refused before anything is written, and auto epochs within the time budget."""

import json
import re

import pytest

from xmctag import run_dir as layout


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


@pytest.mark.e2e
def test_the_dual_encoder_plans_on_the_whole_budget_when_no_classifier_stage_will_run(
        small_catalog_dir, tiny_encoder_dir, tmp_path, monkeypatch):
    from xmctag import Config, train
    from xmctag.training.dual_encoder import DualEncoderStage

    budgets = []
    monkeypatch.setattr(DualEncoderStage, "plan", lambda self, budget, show: budgets.append(budget) or 0)
    for name, max_labels in (("with-classifier", 0), ("without", 1)):
        config = Config(encoder=tiny_encoder_dir, batch_size=32, max_length=16, label_max_length=12,
                        label_vector_epochs=1, knn_neighbours=0, lexical="none", time_budget_minutes=8,
                        classifier_epochs="auto", classifier_max_labels=max_labels, auto_max_epochs=0)
        train(small_catalog_dir / "train.parquet", small_catalog_dir / "labels.parquet", tmp_path / name,
              config=config, progress=False)
    assert budgets == [pytest.approx(8 * Config().dual_encoder_budget_share), pytest.approx(8)]


@pytest.mark.e2e
def test_a_run_that_will_not_fit_in_memory_is_refused_before_anything_is_written(
        small_catalog_dir, tiny_encoder_dir, tmp_path):
    from xmctag import Config, train
    from xmctag.errors import UserError

    config = Config(encoder=tiny_encoder_dir, epochs=0, classifier_epochs=0, max_length=16, label_max_length=12,
                    max_memory_gb=0.5)
    out = tmp_path / "run"
    with pytest.raises(UserError) as caught:
        train(small_catalog_dir / "train.parquet", small_catalog_dir / "labels.parquet", out, config=config,
              progress=False)
    message = str(caught.value)
    assert "\n" not in message
    assert re.match(r"train: estimated peak memory \d+\.\d GiB is more than the 0\.5 GiB available \(largest part: "
                    r"libraries", message), message
    assert "max_memory_gb" in message
    assert not out.exists()


def test_the_memory_estimate_grows_with_the_data_and_shortlists_bound_the_label_stages():
    from xmctag import Config
    from xmctag.training.memory import GiB, estimate_memory

    def estimate(n_train, n_labels, **settings):
        parts = estimate_memory(Config(**settings), n_train, 10_000, n_labels, int(0.9 * n_labels), n_train * 60,
                                384, 22_700_000, 6, 12)
        return parts["host"]

    small, large = estimate(45_000, 7_000), estimate(295_000, 131_000)
    assert sum(large.values()) > 1.5 * sum(small.values())
    # 131K labels on a shortlist: a batch of logits over all labels is not what the label-vector stage needs.
    dense = estimate_memory(Config(label_shortlist_above=10**7), 295_000, 10_000, 1_300_000, 1_200_000,
                            295_000 * 60, 384, 22_700_000, 6, 12)["host"]
    shortlisted = estimate_memory(Config(), 295_000, 10_000, 1_300_000, 1_200_000, 295_000 * 60, 384, 22_700_000, 6,
                                  12)["host"]
    assert sum(shortlisted.values()) < sum(dense.values())
    assert sum(large.values()) < 16 * GiB
