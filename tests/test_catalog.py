"""io/catalog: reading a catalog to tag, with clear errors naming the file, row and column, or counted skips."""

import polars as pl
import pytest
from conftest import write_catalog

from xmctag import UserError

TITLES = ["acme red shirt", "zeta blue jeans with a much longer title than the others, and more words", "cap",
          "nova white watch", "orbit pink dress", "lumen grey belt", "acme black socks and a yellow bag"]


def test_bad_inputs_are_clear_errors(tagger, tmp_path):
    pl.DataFrame({"id": ["a"], "name": ["red shirt"]}).write_parquet(tmp_path / "nocol.parquet")
    with pytest.raises(UserError, match=r"nocol.parquet: missing column\(s\) title"):
        tagger.tag_file(tmp_path / "nocol.parquet", tmp_path / "o.parquet", progress=False)
    (tmp_path / "garbage.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(UserError, match=r"garbage.parquet: not a Parquet file \(xmctag tag reads Parquet catalogs"):
        tagger.tag_file(tmp_path / "garbage.parquet", tmp_path / "o.parquet", progress=False)
    (tmp_path / "truncated.parquet").write_bytes(b"PAR1 and then nothing")
    with pytest.raises(UserError, match="truncated.parquet: not a readable Parquet file"):
        tagger.tag_file(tmp_path / "truncated.parquet", tmp_path / "o.parquet", progress=False)
    with pytest.raises(UserError, match="no such file"):
        tagger.tag_file(tmp_path / "missing.parquet", progress=False)
    with pytest.raises(UserError, match="--format"):
        tagger.tag_file(write_catalog(tmp_path / "ok.parquet", TITLES), tmp_path / "o.xml", fmt="xml",
                        progress=False)
    assert not list(tmp_path.glob("o.*")) and not list(tmp_path.glob(".o*"))


# -- bad input: clear errors naming the file and column, or counted skips ------------------------------------------
@pytest.mark.parametrize("column,values,dtype", [
    ("title", [["red", "shirt"], ["blue"]], pl.List(pl.String)),
    ("title", [{"a": "red"}, {"a": "blue"}], pl.Struct({"a": pl.String})),
    ("title", [b"red shirt", b"blue"], pl.Binary),
    ("id", [["a"], ["b"]], pl.List(pl.String)),
])
def test_a_column_that_is_not_text_is_a_clear_error(tagger, tmp_path, column, values, dtype):
    data = {"id": ["a", "b"], "title": ["red shirt", "blue jeans"], column: pl.Series(values, dtype=dtype)}
    catalog = tmp_path / "typed.parquet"
    pl.DataFrame(data).write_parquet(catalog)
    pattern = rf"typed.parquet: column '{column}' has type {pl.DataFrame(data).schema[column]}".replace("(", r"\(")
    with pytest.raises(UserError, match=pattern.replace(")", r"\)")):
        tagger.tag_file(catalog, tmp_path / "out.parquet", progress=False)
    with pytest.raises(UserError, match=f"frame: column '{column}' has type"):
        tagger.tag(pl.DataFrame(data))
    assert list(tmp_path.iterdir()) == [catalog]


def test_numeric_text_and_id_columns_are_read_as_strings(tagger, tmp_path):
    catalog = tmp_path / "numbers.parquet"
    pl.DataFrame({"id": [7, 8], "title": [123, 456]}).write_parquet(catalog)
    summary = tagger.tag_file(catalog, tmp_path / "out.parquet", top_k=2, progress=False)
    assert summary.rows_tagged == 2
    assert pl.read_parquet(tmp_path / "out.parquet")["id"].to_list() == ["7", "8"]


def test_a_catalog_that_is_not_parquet_is_caught_by_its_content(tagger, tmp_path):
    frame = pl.DataFrame({"id": ["a", "b"], "title": ["acme red shirt", "blue jeans"]})
    frame.write_csv(tmp_path / "cat.csv")
    frame.write_csv(tmp_path / "csv-named.parquet")
    for name in ("cat.csv", "csv-named.parquet"):
        with pytest.raises(UserError, match=rf"{name}: not a Parquet file \(xmctag tag reads Parquet catalogs\)"):
            tagger.tag_file(tmp_path / name, tmp_path / "out.parquet", progress=False)
    frame.write_parquet(tmp_path / "parquet-named.csv")  # the content decides, not the extension
    assert tagger.tag_file(tmp_path / "parquet-named.csv", tmp_path / "out.parquet", progress=False).rows_tagged == 2


def test_rows_without_an_id_are_skipped_and_counted(tagger, tmp_path):
    ids = ["a", None, "", "  ", "b", None, "c"]
    titles = ["acme red shirt", "blue jeans", "cap", "nova watch", None, None, "  "]
    catalog = write_catalog(tmp_path / "cat.parquet", titles, ids=ids)
    summary = tagger.tag_file(catalog, tmp_path / "out.parquet", top_k=2, batch_size=3, progress=False)
    assert summary.rows_read == 7 and summary.rows_tagged == 1
    assert summary.skipped == {"no id": 4, "empty text": 2}  # a row with neither counts once, as "no id"
    assert pl.read_parquet(tmp_path / "out.parquet")["id"].to_list() == ["a"]
    with pytest.raises(UserError, match=r"cat.parquet: row 1 has no id in column 'id' \(--strict\)"):
        tagger.tag_file(catalog, tmp_path / "strict.parquet", strict=True, progress=False)
    assert not (tmp_path / "strict.parquet").exists()
    out = tagger.tag(pl.DataFrame({"id": [None, "x"], "title": ["red shirt", "blue jeans"]}), top_k=2)
    assert out["id"].to_list() == ["x"]


def test_a_catalog_corrupt_mid_file_fails_cleanly(tagger, tmp_path):
    # Header and footer intact, a data page in the middle overwritten: the error comes after some batches were
    # tagged, and still no output (or temporary file) is left behind.
    import pyarrow.parquet as pq

    frame = pl.DataFrame({"id": [f"p{i}" for i in range(3000)], "title": [f"red shirt no {i}" for i in range(3000)]})
    pq.write_table(frame.to_arrow(), tmp_path / "corrupt.parquet", row_group_size=1000, compression="none")
    data = bytearray((tmp_path / "corrupt.parquet").read_bytes())
    middle = len(data) * 2 // 3
    data[middle:middle + 4000] = b"\xff" * 4000
    (tmp_path / "corrupt.parquet").write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"corrupt.parquet: "):
        tagger.tag_file(tmp_path / "corrupt.parquet", tmp_path / "out.parquet", batch_size=500, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.parquet"]


def test_a_directory_as_catalog_says_so(tagger, tmp_path):
    with pytest.raises(UserError, match=rf"{tmp_path}: is a directory, not a Parquet file"):
        tagger.tag_file(tmp_path, tmp_path / "out.parquet", progress=False)
