"""The Config object and the data contract readers."""

import polars as pl
import pytest

from xmctag import Config, UserError, train
from xmctag.io.datasets import LabelTable, load_labelled_set


def test_config_layers_defaults_toml_and_overrides(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('[xmctag]\nepochs = 7\nlr = 0.001\ntext_cols = ["title", "description"]\n')
    config = Config.create(toml, epochs=3, lr=None)
    assert config.epochs == 3 and config.lr == 0.001 and config.text_cols == ["title", "description"]
    config.save(tmp_path / "config.json")
    assert Config.load(tmp_path / "config.json") == config


@pytest.mark.parametrize("text,message", [
    ("epochs = 1\nlearning_rate = 2\n", "unknown setting"),
    ("epochs = [", "not valid TOML"),
    ("margin_min = 0.5\nmargin_max = 0.1\n", "margin_min <= margin_max"),
    ('loss = "hinge"\n', "loss must be auto, triplet or infonce"),
    ('centering = "yes"\n', "centering must be auto, none or ema"),
    ("center_momentum = 1.0\n", "center_momentum must be in"),
])
def test_bad_config_files(tmp_path, text, message):
    (tmp_path / "c.toml").write_text(text)
    with pytest.raises(UserError, match=message):
        Config.create(tmp_path / "c.toml")


@pytest.mark.parametrize("text,message", [
    ('batch_size = "four"\n', 'c.toml: batch_size = "four": expected an integer'),
    ('lr = "fast"\n', 'lr = "fast": expected a number'),
    ('text_cols = "title"\n', 'text_cols = "title": expected a list of strings, e.g. ["title"]'),
    ("batch_size = 32.7\n", "batch_size = 32.7: expected an integer"),
    ("max_length = true\n", "max_length = true: expected an integer"),
    ("epochs = 2.5\n", 'epochs = 2.5: expected an integer or "auto"'),
    ("image_cache_dir = 3\n", "image_cache_dir = 3: expected a string or null"),
    ("eval_ks = [1, \"5\"]\n", 'eval_ks = [1, "5"]: expected a list of integers'),
    ("batchsize = 64\n", "unknown setting(s) batchsize (did you mean batch_size?)"),
    ("epochs = 3\n[xmctag]\nlr = 0.1\n", "settings outside the [xmctag] table: epochs"),
    ("max_length = 0\n", "max_length 0: must be >= 4"),
])
def test_config_values_of_the_wrong_type_name_the_key_and_the_expected_type(tmp_path, text, message):
    import re

    (tmp_path / "c.toml").write_text(text)
    with pytest.raises(UserError, match=re.escape(message)):
        Config.create(tmp_path / "c.toml")


def test_config_accepts_integers_for_numbers_and_checks_overrides_too(tmp_path):
    (tmp_path / "c.toml").write_text('lr = 1\nlora_alpha = 16\nepochs = "auto"\nimage_cache_dir = "cache"\n')
    config = Config.create(tmp_path / "c.toml", batch_size=16)
    assert (config.lr, config.lora_alpha, config.batch_size) == (1, 16, 16)
    with pytest.raises(UserError, match="arguments: batch_size = 3.5: expected an integer"):
        Config.create(None, batch_size=3.5)
    with pytest.raises(UserError, match="text_cols"):  # the Python API: checked when training validates it
        Config(text_cols="title").validate()


def test_label_table_with_synonyms_csv_and_duplicates(tmp_path):
    pl.DataFrame({"label": [1, 2], "text": ["beef", None], "alt_texts": [["cattle meat", "veal"], []]}) \
        .write_parquet(tmp_path / "l.parquet")
    labels = LabelTable.load(tmp_path / "l.parquet", Config())
    assert labels.ids == ["1", "2"]
    assert labels.texts == ["beef ; cattle meat ; veal", "2"]  # a label without text falls back to its id
    (tmp_path / "l.csv").write_text("label,text,alt_texts\na,apple,pome\nb,banana,\n")
    assert LabelTable.load(tmp_path / "l.csv", Config()).texts == ["apple ; pome", "banana"]
    # CSV is read as text: numeric-looking ids stay as written; a `synonyms` column is read like `alt_texts`
    (tmp_path / "n.csv").write_text("label,text,synonyms\n001,apple,pome\n1e3,banana,\n")
    numeric = LabelTable.load(tmp_path / "n.csv", Config())
    assert numeric.ids == ["001", "1e3"] and numeric.texts == ["apple ; pome", "banana"]
    (tmp_path / "d.csv").write_text("label,text\na,apple\na,again\n")
    with pytest.raises(UserError, match="duplicate label id"):
        LabelTable.load(tmp_path / "d.csv", Config())


def test_training_rows_without_text_or_known_labels_are_skipped_and_counted(tmp_path):
    pl.DataFrame({"label": ["x", "y"], "text": ["ex", "why"]}).write_parquet(tmp_path / "l.parquet")
    pl.DataFrame({
        "id": [1, 2, 3, 4],
        "title": ["a", None, "c", "d"],
        "description": [None, "only a description", "", None],
        "labels": [["x", "zzz"], ["y"], ["zzz"], ["y", "y"]],
    }).write_parquet(tmp_path / "t.parquet")
    config = Config(text_cols=["title", "description"])
    data = load_labelled_set(tmp_path / "t.parquet", config, LabelTable.load(tmp_path / "l.parquet", config))
    assert data.ids == ["1", "2", "4"]
    assert data.texts == ["a", "only a description", "d"]
    assert [x.tolist() for x in data.labels] == [[0], [1], [1]]
    assert data.skipped == {"no known label": 1} and data.unknown_labels == 2
    with pytest.raises(UserError, match="labels must be a list"):
        pl.DataFrame({"id": [1], "title": ["a"], "labels": ["x"]}).write_parquet(tmp_path / "bad.parquet")
        load_labelled_set(tmp_path / "bad.parquet", Config(), LabelTable.load(tmp_path / "l.parquet", config))


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


def test_training_and_tagging_build_the_same_product_text():
    # Training reads with pyarrow (product_text), tagging streams with polars (product_text_expr): same text.
    import polars as pl

    from xmctag.io.datasets import product_text, product_text_expr

    frame = pl.DataFrame({"title": ["  a ", None, "", "b", "  ", 7], "desc": ["x", "y", None, " ", "", None]},
                         schema={"title": pl.String, "desc": pl.String}, strict=False)
    expected = frame.select(product_text_expr(["title", "desc"]).alias("t"))["t"].to_list()
    assert expected == ["a ; x", "y", None, "b", None, "7"]
    assert [product_text(list(row)) for row in frame.iter_rows()] == expected
