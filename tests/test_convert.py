"""`xmctag convert` on small fixtures in the Extreme Classification Repository raw format."""

import gzip
import json

import polars as pl
import pytest

from xmctag import UserError
from xmctag.convert import convert_xc_raw


def write_lines(path, records):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


@pytest.fixture()
def xc_dir(tmp_path):
    src = tmp_path / "LF-Tiny"
    src.mkdir()
    write_lines(src / "lbl.raw.json.gz", [{"uid": "L0", "title": "red things"}, {"uid": "L1", "title": "shirts"},
                                          {"uid": "L2", "title": "shoes"}])
    write_lines(src / "trn.raw.json.gz", [
        {"uid": "B001", "title": "red shirt", "content": "a shirt that is red", "target_ind": [0, 1],
         "target_rel": [1.0, 1.0]},
        {"uid": "B002", "title": "shoes", "content": "", "target_ind": [2], "target_rel": [1.0]},
    ])
    write_lines(src / "tst.raw.json", [{"uid": "B003", "title": "red shoes", "target_ind": [2, 0]}])
    return src


def test_convert_writes_the_data_contract(xc_dir, tmp_path):
    result = convert_xc_raw(xc_dir, tmp_path / "out")
    assert result.written == {"labels.parquet": 3, "train.parquet": 2, "test.parquet": 1}
    assert result.duplicates_skipped == {"train.parquet": 0, "test.parquet": 0}
    labels = pl.read_parquet(tmp_path / "out/labels.parquet")
    assert labels.to_dict(as_series=False) == {"label": ["L0", "L1", "L2"], "text": ["red things", "shirts", "shoes"]}
    train = pl.read_parquet(tmp_path / "out/train.parquet")
    assert train.columns == ["id", "title", "description", "labels"]
    assert train["labels"].to_list() == [["L0", "L1"], ["L2"]]
    assert train["description"].to_list() == ["a shirt that is red", None]
    test = pl.read_parquet(tmp_path / "out/test.parquet")
    assert test.row(0) == ("B003", "red shoes", None, ["L2", "L0"])


def test_converted_data_loads_for_training(xc_dir, tmp_path):
    from xmctag import Config
    from xmctag.io.datasets import LabelTable, load_labelled_set

    convert_xc_raw(xc_dir, tmp_path / "out")
    config = Config()
    labels = LabelTable.load(tmp_path / "out/labels.parquet", config)
    data = load_labelled_set(tmp_path / "out/train.parquet", config, labels)
    assert data.texts == ["red shirt", "shoes"] and [x.tolist() for x in data.labels] == [[0, 1], [2]]


def test_convert_errors_name_file_and_line(xc_dir, tmp_path):
    write_lines(xc_dir / "tst.raw.json", [{"uid": "B9", "title": "x", "target_ind": [7]}])
    with pytest.raises(UserError, match=r"tst.raw.json: line 1: target_ind 7 refers to a label"):
        convert_xc_raw(xc_dir, tmp_path / "out")
    assert not (tmp_path / "out/test.parquet").exists()
    (xc_dir / "trn.raw.json.gz").write_bytes(gzip.compress(b'{"uid": 1}\nnot json\n'))
    with pytest.raises(UserError, match=r"trn.raw.json.gz: line 2 is not valid JSON"):
        convert_xc_raw(xc_dir, tmp_path / "out")
    with pytest.raises(UserError, match="no lbl.raw.json"):
        convert_xc_raw(tmp_path / "out", tmp_path / "out2")


@pytest.mark.parametrize("target_ind, message", [
    ([-1], r"line 1: target_ind -1 refers to a label"),  # Python would have read -1 as the last label
    ([1.0], r"line 1: target_ind 1.0 refers to a label"),
    (2, r"line 1: target_ind must be a list of label line numbers, not int"),
])
def test_convert_rejects_bad_target_indices(xc_dir, tmp_path, target_ind, message):
    write_lines(xc_dir / "tst.raw.json", [{"uid": "B9", "title": "x", "target_ind": target_ind}])
    with pytest.raises(UserError, match=message):
        convert_xc_raw(xc_dir, tmp_path / "out")
    assert not (tmp_path / "out/test.parquet").exists()


def test_convert_rejects_duplicate_label_uids(xc_dir, tmp_path):
    write_lines(xc_dir / "lbl.raw.json.gz", [{"uid": "L0", "title": "a"}, {"uid": "L1", "title": "b"},
                                             {"uid": "L0", "title": "c"}])
    with pytest.raises(UserError, match=r"lbl.raw.json.gz: line 3: label uid 'L0' already on line 1"):
        convert_xc_raw(xc_dir, tmp_path / "out")


def test_convert_skips_and_counts_duplicate_product_uids(xc_dir, tmp_path):
    from typer.testing import CliRunner

    from xmctag.cli import app

    write_lines(xc_dir / "tst.raw.json", [{"uid": "B3", "title": "red shoes", "target_ind": [2]},
                                          {"uid": "B3", "title": "red shoes again", "target_ind": [0]},
                                          {"uid": "B4", "title": "shirt", "target_ind": [1]}])
    result = CliRunner().invoke(app, ["convert", str(xc_dir), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "test.parquet: 2 rows (1 lines skipped: uid already seen)" in result.output
    test = pl.read_parquet(tmp_path / "out/test.parquet")
    assert test["id"].to_list() == ["B3", "B4"] and test["title"].to_list() == ["red shoes", "shirt"]
