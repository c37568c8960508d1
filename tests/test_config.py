"""Config: layered defaults, TOML and overrides; type checks naming the key."""


import pytest

from xmctag import Config, UserError


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
