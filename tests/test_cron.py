"""The cron contract of ``xmctag tag``: exit codes, checks of the result, --summary-json, provenance, one run per
output, cleanup after SIGTERM / SIGKILL, file modes, symlinks, long names, a full disk, terminal escapes, CSV
formulas and huge titles."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import write_catalog
from typer.testing import CliRunner

from xmctag import UserError, export
from xmctag.cli import app
from xmctag.errors import EnvironmentFailure, OutputLocked, ThresholdError
from xmctag.io.atomic import OutputLock
from xmctag.io.predictions import read_parquet_metadata
from xmctag.summary import RunChecks, TagSummary

ROOT = Path(__file__).resolve().parent.parent


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def leftovers(directory: Path) -> list[str]:
    """Hidden files xmctag may leave beside an output: temporary files and locks."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# -- exit codes and checks of the result -----------------------------------------------------------------------------
def test_a_run_that_tags_nothing_fails_with_exit_3_and_writes_nothing(bundle, tmp_path):
    catalog = write_catalog(tmp_path / "skipped.parquet", [None, " "])
    result = invoke("tag", catalog, "--model", bundle, "-o", tmp_path / "out.parquet", "--quiet",
                    "--summary-json", tmp_path / "summary.json")
    assert result.exit_code == 3, result.output
    assert "no product was tagged (all 2 rows skipped)" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "out.parquet").exists() and leftovers(tmp_path) == []
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["status"], summary["exit_code"], summary["rows"]["read"], summary["rows"]["skipped"]) == (
        "failed", 3, 2, 2)
    # Accepted when asked for: an empty, complete file.
    assert invoke("tag", catalog, "--model", bundle, "-o", tmp_path / "out.parquet", "--quiet",
                  "--allow-empty").exit_code == 0
    assert pl.read_parquet(tmp_path / "out.parquet").height == 0


def test_max_skipped_share(bundle, tmp_path):
    catalog = write_catalog(tmp_path / "c.parquet", ["acme red shirt", None, "zeta blue jeans", "nova pink cap"])
    args = ["tag", catalog, "--model", bundle, "-o", tmp_path / "out.csv", "--quiet"]
    result = invoke(*args, "--max-skipped-share", "0.2")
    assert result.exit_code == 3 and "1 of 4 rows skipped (25.0% > --max-skipped-share 0.2)" in result.stderr
    assert not (tmp_path / "out.csv").exists()
    assert invoke(*args, "--max-skipped-share", "0.25").exit_code == 0
    assert pl.read_csv(tmp_path / "out.csv")["id"].unique().len() == 3
    assert invoke(*args, "--max-skipped-share", "1.5").exit_code == 2  # a share is in [0, 1]


def test_image_failures_fail_a_run_when_all_or_more_than_the_share_fail():
    images = {"used": 0, "missing": 3, "failed": 1, "broken": 0, "cached": 0, "newly_embedded": 0,
              "products_with_image": 0}
    summary = TagSummary(output=None, rows_read=4, rows_tagged=4, images=images)
    assert RunChecks().failures(summary) == [
        "every one of the 4 images failed; --max-image-failure-share 1 accepts that"]
    assert RunChecks(max_image_failure_share=1.0).failures(summary) == []
    summary.images = {**images, "used": 6}  # 4 of 10 failed
    assert RunChecks().failures(summary) == []
    assert RunChecks(max_image_failure_share=0.3).failures(summary) == [
        "4 of 10 images failed (40.0% > --max-image-failure-share 0.3)"]
    with pytest.raises(ThresholdError, match="no output written"):
        RunChecks(max_image_failure_share=0.3).check(summary)


def test_summary_json_of_a_good_run_and_provenance_in_the_file(bundle, tmp_path):
    catalog = write_catalog(tmp_path / "c.parquet", ["acme red shirt", "zeta blue jeans", None])
    result = invoke("tag", catalog, "--model", bundle, "-o", tmp_path / "out.parquet", "--quiet",
                    "--summary-json", tmp_path / "s.json")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "s.json").read_text())
    digest = hashlib.sha256(catalog.read_bytes()).hexdigest()
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert (summary["command"], summary["status"], summary["exit_code"]) == ("tag", "ok", 0)
    assert summary["rows"] == {"read": 3, "tagged": 2, "skipped": 1, "skipped_by_reason": {"empty text": 1},
                               "without_labels": 0, "fewer_than_k": 0}
    assert summary["catalog_sha256"] == digest and summary["bundle_id"] == manifest["bundle_id"]
    assert summary["output"] == str(tmp_path / "out.parquet") and summary["format"] == "parquet"
    assert summary["versions"]["xmctag"] and summary["seconds"] >= 0 and summary["finished"] >= summary["started"]
    meta = read_parquet_metadata(tmp_path / "out.parquet")
    assert meta["catalog_sha256"] == digest and meta["bundle_id"] == manifest["bundle_id"]
    assert meta["xmctag_version"] == summary["versions"]["xmctag"] and meta["tagged_at"].startswith("20")
    # CSV and JSONL have no metadata of their own: the provenance is beside them.
    assert invoke("tag", catalog, "--model", bundle, "-o", tmp_path / "out.jsonl", "--quiet").exit_code == 0
    sidecar = json.loads((tmp_path / "out.jsonl.meta.json").read_text())
    assert sidecar["xmctag.catalog_sha256"] == digest and sidecar["xmctag.bundle_id"] == manifest["bundle_id"]


def test_summary_json_is_checked_before_the_run(bundle, tmp_path):
    catalog = write_catalog(tmp_path / "c.parquet", ["acme red shirt"])
    result = invoke("tag", catalog, "--model", bundle, "-o", tmp_path / "out.parquet", "--quiet",
                    "--summary-json", tmp_path / "nowhere" / "s.json")
    assert result.exit_code == 2 and "--summary-json" in result.stderr
    assert not (tmp_path / "out.parquet").exists()


# -- one run per output ------------------------------------------------------------------------------------------------
def test_a_second_run_on_the_same_output_refuses_with_exit_75(bundle, tmp_path):
    catalog = write_catalog(tmp_path / "c.parquet", ["acme red shirt"])
    output = tmp_path / "out.parquet"
    with OutputLock(output):  # another run is writing it
        result = invoke("tag", catalog, "--model", bundle, "-o", output, "--quiet")
        assert result.exit_code == 75, result.output
        assert "another xmctag run is writing it (pid" in result.stderr and not output.exists()
    assert invoke("tag", catalog, "--model", bundle, "-o", output, "--quiet").exit_code == 0
    assert leftovers(tmp_path) == []  # the lock goes with the run


def test_a_stale_lock_file_does_not_block_the_next_night(bundle, tmp_path):
    catalog = write_catalog(tmp_path / "c.parquet", ["acme red shirt"])
    output = tmp_path / "out.parquet"
    OutputLock(output).path.write_text("pid 99999")  # left by a killed run: nobody holds it
    assert invoke("tag", catalog, "--model", bundle, "-o", output, "--quiet").exit_code == 0
    assert output.exists() and leftovers(tmp_path) == []


def _tag_in_a_subprocess(bundle: Path, catalog: Path, output: Path) -> subprocess.Popen:
    code = ("import sys; from xmctag.cli import main; sys.argv = ['xmctag', 'tag', *sys.argv[1:]]; main()")
    return subprocess.Popen([sys.executable, "-c", code, str(catalog), "--model", str(bundle), "-o", str(output),
                             "--batch-size", "64", "--quiet"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_temporary_file(directory: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while not any(p.name.endswith(".tmp") for p in directory.iterdir()):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run never started writing"
        time.sleep(0.05)
    time.sleep(0.3)  # a few batches in


@pytest.fixture()
def big_catalog(tmp_path):
    rng = np.random.default_rng(0)
    words = ["acme", "zeta", "red", "blue", "shirt", "jeans", "cap", "bag", "green", "nova"]
    titles = [" ".join(rng.choice(words, 6)) for _ in range(60_000)]
    return write_catalog(tmp_path / "big.parquet", titles)


def test_sigterm_exits_143_and_leaves_nothing(bundle, big_catalog, tmp_path):
    output = tmp_path / "out" / "preds.parquet"
    output.parent.mkdir()
    process = _tag_in_a_subprocess(bundle, big_catalog, output)
    _wait_for_temporary_file(output.parent, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert "terminated" in stderr and "Traceback" not in stderr
    assert list(output.parent.iterdir()) == []  # no output, no temporary file, no lock


def test_after_sigkill_the_next_run_sweeps_the_temporary_file(bundle, big_catalog, tmp_path):
    output = tmp_path / "out" / "preds.parquet"
    output.parent.mkdir()
    process = _tag_in_a_subprocess(bundle, big_catalog, output)
    _wait_for_temporary_file(output.parent, process)
    process.kill()
    process.communicate(timeout=60)
    assert any(p.name.endswith(".tmp") for p in output.parent.iterdir())  # what SIGKILL leaves
    other = tmp_path / "out" / ".preds.parquet.keep.tmp"  # not ours: a name the sweep must not match
    other.write_text("someone else's")
    small = write_catalog(tmp_path / "small.parquet", ["acme red shirt"])
    assert invoke("tag", small, "--model", bundle, "-o", output, "--quiet").exit_code == 0
    assert sorted(p.name for p in output.parent.iterdir()) == [other.name, "preds.parquet"]


# -- files the next job can read ---------------------------------------------------------------------------------------
def test_output_modes_follow_the_umask_or_the_replaced_file(bundle, trained_run, tmp_path):
    catalog = write_catalog(tmp_path / "c.parquet", ["acme red shirt"])
    old = os.umask(0o022)
    try:
        assert invoke("tag", catalog, "--model", bundle, "-o", tmp_path / "a.parquet", "--quiet").exit_code == 0
        assert (tmp_path / "a.parquet").stat().st_mode & 0o777 == 0o644
        (tmp_path / "b.csv").write_text("old")
        os.chmod(tmp_path / "b.csv", 0o640)
        assert invoke("tag", catalog, "--model", bundle, "-o", tmp_path / "b.csv", "--quiet").exit_code == 0
        assert (tmp_path / "b.csv").stat().st_mode & 0o777 == 0o640
        os.umask(0o027)
        exported = export(trained_run, tmp_path / "bundle", progress=False)
        assert exported.stat().st_mode & 0o777 == 0o750
    finally:
        os.umask(old)


def test_a_symlinked_output_is_written_through(bundle, tmp_path):
    catalog = write_catalog(tmp_path / "c.parquet", ["acme red shirt"])
    (tmp_path / "real").mkdir()
    target, link = tmp_path / "real" / "preds.parquet", tmp_path / "latest.parquet"
    link.symlink_to(target)
    assert invoke("tag", catalog, "--model", bundle, "-o", link, "--quiet").exit_code == 0
    assert link.is_symlink() and pl.read_parquet(target).height == 1


def test_a_long_output_name_works(bundle, tmp_path):
    catalog = write_catalog(tmp_path / "c.parquet", ["acme red shirt"])
    output = tmp_path / ("p" * 246 + ".parquet")  # 254 characters: the file system's limit is 255
    assert invoke("tag", catalog, "--model", bundle, "-o", output, "--quiet").exit_code == 0
    assert pl.read_parquet(output).height == 1 and leftovers(tmp_path) == []


def test_a_full_disk_is_one_line_with_exit_74_and_no_output(bundle, big_catalog, tmp_path):
    # A real limit on file size (RLIMIT_FSIZE, SIGXFSZ ignored): writes past it fail with EFBIG, as on a full disk.
    output = tmp_path / "out" / "preds.csv"
    output.parent.mkdir()
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000)); "
            "from xmctag.cli import main; sys.argv = ['xmctag', 'tag', *sys.argv[1:]]; main()")
    result = subprocess.run([sys.executable, "-c", code, str(big_catalog), "--model", str(bundle), "-o", str(output),
                             "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 74, result.stderr
    assert "File too large" in result.stderr and "nothing was written" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert list(output.parent.iterdir()) == []


def test_disk_errors_from_the_writer_are_environment_failures(tagger, tmp_path, monkeypatch):
    import errno

    from xmctag.io.writers import PredictionWriter

    def full(self, *args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PredictionWriter, "_write", full)
    catalog = write_catalog(tmp_path / "c.parquet", ["acme red shirt"])
    with pytest.raises(EnvironmentFailure, match="No space left on device") as caught:
        tagger.tag_file(catalog, tmp_path / "out.parquet", progress=False)
    assert caught.value.exit_code == 74 and list(tmp_path.iterdir()) == [catalog]


def test_show_prints_terminal_escapes_as_text(bundle, tmp_path):
    catalog = write_catalog(tmp_path / "c.parquet", ["acme \x1b[31mred\x1b[0m shirt\x07"], ids=["id\x1b]0;x\x07"])
    result = invoke("tag", catalog, "--model", bundle, "-o", tmp_path / "out.parquet", "--quiet", "--show", 1)
    assert result.exit_code == 0
    assert "\x1b" not in result.stdout and "\x07" not in result.stdout
    assert "\\x1b[31mred" in result.stdout


def test_csv_formulas_are_escaped_on_request(bundle, tmp_path):
    catalog = write_catalog(tmp_path / "c.parquet", ["acme red shirt", "zeta blue jeans"], ids=["=1+1", "@SUM(A1)"])
    assert invoke("tag", catalog, "--model", bundle, "-o", tmp_path / "raw.csv", "--quiet").exit_code == 0
    assert set(pl.read_csv(tmp_path / "raw.csv")["id"]) == {"=1+1", "@SUM(A1)"}  # data, as written
    assert invoke("tag", catalog, "--model", bundle, "-o", tmp_path / "safe.csv", "--quiet",
                  "--escape-formulas").exit_code == 0
    assert set(pl.read_csv(tmp_path / "safe.csv")["id"]) == {"'=1+1", "'@SUM(A1)"}


def test_an_empty_jsonl_output_reads_with_the_documented_columns(bundle, tmp_path):
    duckdb = pytest.importorskip("duckdb")
    catalog = write_catalog(tmp_path / "c.parquet", [None])
    assert invoke("tag", catalog, "--model", bundle, "-o", tmp_path / "out.jsonl", "--quiet",
                  "--allow-empty").exit_code == 0
    query = (f"select id, label, score from read_json('{tmp_path / 'out.jsonl'}', columns={{id: 'VARCHAR', "
             "rank: 'INTEGER', label: 'VARCHAR', label_text: 'VARCHAR', score: 'FLOAT', bundle_id: 'VARCHAR', "
             "bundle: 'VARCHAR'})")
    assert duckdb.sql(query).fetchall() == []


# -- huge rows ---------------------------------------------------------------------------------------------------------
def test_a_huge_title_is_cut_before_tokenising_and_tags_as_its_beginning(tagger, tmp_path, monkeypatch):
    head = "acme red shirt " * 20
    huge = head + "x " * 2_000_000  # 4 MB of words past the first 128 tokens
    lengths = []
    encode = tagger.tokenizer.encode_batch
    monkeypatch.setattr(tagger, "tokenizer", type("T", (), {"encode_batch": lambda self, texts: (
        lengths.extend(len(t) for t in texts), encode(texts))[1]})())
    indices, scores = tagger.predict([huge, head + "x " * 1000], top_k=3)
    assert max(lengths) <= tagger.manifest["tokenization"]["max_length"] * 101
    np.testing.assert_array_equal(indices[0], indices[1])  # the same first tokens: the same labels
    np.testing.assert_allclose(scores[0], scores[1], atol=1e-6)


def test_user_error_exit_codes_are_distinct():
    assert (UserError("x").exit_code, ThresholdError("x").exit_code, EnvironmentFailure("x").exit_code,
            OutputLocked("x").exit_code) == (2, 3, 74, 75)
