"""io/datasets: the label table, training rows skipped and counted, one product text for training and tagging."""


import polars as pl
import pytest

from xmctag import Config, UserError
from xmctag.io.datasets import LabelTable, load_labelled_set


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


def test_training_and_tagging_build_the_same_product_text():
    # Training reads with pyarrow (product_text), tagging streams with polars (product_text_expr): same text.
    import polars as pl

    from xmctag.io.datasets import product_text, product_text_expr

    frame = pl.DataFrame({"title": ["  a ", None, "", "b", "  ", 7], "desc": ["x", "y", None, " ", "", None]},
                         schema={"title": pl.String, "desc": pl.String}, strict=False)
    expected = frame.select(product_text_expr(["title", "desc"]).alias("t"))["t"].to_list()
    assert expected == ["a ; x", "y", None, "b", None, "7"]
    assert [product_text(list(row)) for row in frame.iter_rows()] == expected
