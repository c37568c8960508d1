"""The Ray Data engine (``xmctag.engines.ray_engine``) on a real local Ray (2 CPUs): its output equals the local
engine's, a failing block leaves nothing, counts add up, the CLI and what reads its output; and the one-line error
without Ray."""

from __future__ import annotations

import json
import logging
import sys

import numpy as np
import polars as pl
import pytest
from conftest import make_catalog
from typer.testing import CliRunner

from xmctag.cli import app
from xmctag.io.predictions import read_parquet_metadata


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def leftovers(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module (start-up takes seconds), shut down at its end."""
    ray = pytest.importorskip("ray", reason="the Ray engine's tests need the ray extra: pip install -e '.[cpu,ray]'")
    pytest.importorskip("ray.data")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=300 * 1024 * 1024, log_to_driver=False,
                 logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


def catalog_parts(directory, sizes=(700, 800, 650, 750)) -> pl.DataFrame:
    """Parquet files part-0.parquet, ... in ``directory`` (rows without an id or text among them); returns their
    concatenation in name order."""
    directory.mkdir()
    frames = []
    for i, n in enumerate(sizes):
        frame = make_catalog(n, seed=10 + i).drop("labels")
        ids, titles = frame["id"].to_list(), frame["title"].to_list()
        for row in range(3 + i, n, 97):  # a few bad rows per file: no id, blank id, no text
            if row % 3 == 0:
                ids[row] = None
            elif row % 3 == 1:
                ids[row] = "  "
            else:
                titles[row] = None
        frame = pl.DataFrame({"id": ids, "title": titles}, schema={"id": pl.String, "title": pl.String})
        frame.write_parquet(directory / f"part-{i}.parquet", row_group_size=300)
        frames.append(frame)
    (directory / "_SUCCESS").write_text("")  # what Spark leaves: not a Parquet file, ignored
    return pl.concat(frames)


def assert_same_predictions(ray_file, local_file):
    ours, theirs = pl.read_parquet(ray_file), pl.read_parquet(local_file)
    assert ours.columns == theirs.columns
    assert ours["id"].to_list() == theirs["id"].to_list()
    assert ours["labels"].to_list() == theirs["labels"].to_list()
    assert ours["content_hash"].to_list() == theirs["content_hash"].to_list()
    a, b = ours["scores"].to_list(), theirs["scores"].to_list()
    assert all(len(x) == len(y) for x, y in zip(a, b))
    assert np.allclose(np.concatenate(a), np.concatenate(b), atol=1e-6, rtol=0)
    meta, local_meta = read_parquet_metadata(ray_file), read_parquet_metadata(local_file)
    per_run = {"catalog", "catalog_sha256", "tagged_at"}
    assert {k: v for k, v in meta.items() if k not in per_run} == {
        k: v for k, v in local_meta.items() if k not in per_run}


def test_ray_output_equals_the_local_engine_and_counts_add_up(local_ray, bundle, tmp_path):
    from xmctag import RayTagger, Tagger

    whole = catalog_parts(tmp_path / "parts")
    whole.write_parquet(tmp_path / "whole.parquet")
    local = Tagger.load(bundle, device="cpu").tag_file(tmp_path / "whole.parquet", tmp_path / "local.parquet",
                                                       progress=False, batch_size=512)
    assert local.rows_read == 2900 and set(local.skipped) == {"no id", "empty text"}  # the bad rows are there
    for actors, catalog in ((2, tmp_path / "parts"), (1, f"{tmp_path}/parts/part-*.parquet")):
        out = tmp_path / f"ray-{actors}.parquet"
        summary = RayTagger.load(bundle, device="cpu", actors=actors).tag_file(
            catalog, out, progress=False, batch_size=256, summary_json=tmp_path / f"summary-{actors}.json")
        assert_same_predictions(out, tmp_path / "local.parquet")
        assert (summary.rows_read, summary.rows_tagged, summary.skipped) == (
            local.rows_read, local.rows_tagged, local.skipped)
        assert summary.rows_read == summary.rows_tagged + summary.rows_skipped
        report = json.loads((tmp_path / f"summary-{actors}.json").read_text())
        assert (report["status"], report["engine"], report["ray"]["actors"], report["rows"]["read"]) == (
            "ok", "ray", actors, 2900)
    # Other formats go through the same writer: the CSV equals the local engine's CSV.
    RayTagger.load(bundle, device="cpu", actors=2).tag_file(tmp_path / "parts", tmp_path / "ray.csv",
                                                            progress=False, batch_size=1000)
    Tagger.load(bundle, device="cpu").tag_file(tmp_path / "whole.parquet", tmp_path / "local.csv", progress=False)
    ours, theirs = pl.read_csv(tmp_path / "ray.csv"), pl.read_csv(tmp_path / "local.csv")
    assert ours.select("id", "rank", "label").equals(theirs.select("id", "rank", "label"))
    assert np.allclose(ours["score"].to_numpy(), theirs["score"].to_numpy(), atol=1e-6, rtol=0)
    assert leftovers(tmp_path) == []


def test_a_failing_block_leaves_no_output(local_ray, bundle, tmp_path):
    from xmctag import RayTagger
    from xmctag.errors import ThresholdError, UserError

    catalog_parts(tmp_path / "parts")
    out = tmp_path / "preds.parquet"
    tagger = RayTagger.load(bundle, device="cpu", actors=2)
    # --strict: an actor meets a bad row (each file has one in its first block) and raises; the run stops with
    # that error, which names the file and the row, as the local engine's does.
    strict_error = r"part-\d\.parquet: row \d+ (\(id '.*'\) )?has no (id|text) .*\(--strict\)$"
    with pytest.raises(UserError, match=strict_error) as raised:
        tagger.tag_file(tmp_path / "parts", out, progress=False, batch_size=256, strict=True,
                        summary_json=tmp_path / "summary.json")
    assert type(raised.value) is UserError and "\n" not in str(raised.value)
    assert not out.exists() and leftovers(tmp_path) == []
    report = json.loads((tmp_path / "summary.json").read_text())
    assert (report["status"], report["exit_code"]) == ("failed", 2)
    # A file whose footer reads but whose data does not: checked on the driver, fails in an actor.
    broken = tmp_path / "parts" / "part-1.parquet"
    data = bytearray(broken.read_bytes())
    data[8:4000] = bytes(len(data[8:4000]))
    broken.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"part-1\.parquet: cannot read"):
        tagger.tag_file(tmp_path / "parts", out, progress=False, batch_size=256)
    assert not out.exists() and leftovers(tmp_path) == []
    # A check of the result fails after all blocks are tagged: still nothing written.
    broken.unlink()
    with pytest.raises(ThresholdError, match="max-skipped-share"):
        from xmctag.summary import RunChecks

        tagger.tag_file(tmp_path / "parts", out, progress=False, checks=RunChecks(max_skipped_share=0.001))
    assert not out.exists() and leftovers(tmp_path) == []


def test_an_actor_that_dies_mid_run_is_restarted_and_its_block_retried(local_ray, bundle, tmp_path):
    """The actor's process is killed while the run is going (``ray.kill(no_restart=False)``: as a crash would);
    Ray restarts it and retries its block, and the output is still the local engine's, each row once."""
    import threading
    import time

    from xmctag import RayTagger, Tagger

    whole = catalog_parts(tmp_path / "parts")
    whole.write_parquet(tmp_path / "whole.parquet")
    local = Tagger.load(bundle, device="cpu").tag_file(tmp_path / "whole.parquet", tmp_path / "local.parquet",
                                                       progress=False)
    tagger, done, killed = RayTagger.load(bundle, device="cpu", actors=1), {}, []
    run = threading.Thread(target=lambda: done.update(summary=tagger.tag_file(
        tmp_path / "parts", tmp_path / "ray.parquet", progress=False, batch_size=20)))
    run.start()
    deadline = time.monotonic() + 120
    while run.is_alive() and not killed and time.monotonic() < deadline:
        names = [n for n in local_ray.util.list_named_actors() if n.startswith("xmctag-tag-")]
        if names:
            time.sleep(3)  # the actor has loaded the bundle and is tagging its blocks (145 of them)
            local_ray.kill(local_ray.get_actor(names[0]), no_restart=False)
            killed.append(names[0])
        time.sleep(0.1)
    run.join()
    assert killed and "summary" in done
    assert_same_predictions(tmp_path / "ray.parquet", tmp_path / "local.parquet")
    assert (done["summary"].rows_read, done["summary"].rows_tagged) == (local.rows_read, local.rows_tagged)

def test_cli_ray_engine_output_is_read_by_eval_and_diff(local_ray, bundle, tmp_path):
    parts = tmp_path / "parts"
    parts.mkdir()
    truth = pl.concat([make_catalog(300, seed=20 + i) for i in range(3)])
    for i in range(3):
        truth.slice(300 * i, 300).drop("labels").write_parquet(parts / f"part-{i}.parquet")
    truth.write_parquet(tmp_path / "truth.parquet")
    out = tmp_path / "ray.parquet"
    result = invoke("tag", parts, "--model", bundle, "--engine", "ray", "--actors", "2", "-o", out, "--quiet",
                    "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "tagged 900 of 900 rows" in result.stderr and "ray: 2 CPU actors" in result.stderr
    result = invoke("eval", out, "--truth", tmp_path / "truth.parquet", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["rows"] == 900 and 0 <= report["metrics"]["P@1"] <= 1
    assert invoke("tag", tmp_path / "truth.parquet", "--model", bundle, "-o", tmp_path / "local.parquet",
                  "--quiet").exit_code == 0
    result = invoke("diff", tmp_path / "local.parquet", out, "--json")
    assert result.exit_code == 0, result.output
    changes = json.loads(result.stdout)["products"]
    assert (changes["old"], changes["new"], changes["common"], changes["retagged"]) == (900, 900, 900, 0), changes


def test_options_the_ray_engine_does_not_take_are_one_line_errors(bundle, tmp_path, monkeypatch):
    catalog = tmp_path / "c.parquet"
    make_catalog(5, seed=3).write_parquet(catalog)
    result = invoke("tag", catalog, "--model", bundle, "--actors", "2", "-o", tmp_path / "o.parquet")
    assert result.exit_code == 2 and "--actors and --ray-address need --engine ray" in result.stderr
    result = invoke("tag", catalog, "--model", bundle, "--engine", "spark", "-o", tmp_path / "o.parquet")
    assert result.exit_code == 2 and "--engine must be local or ray" in result.stderr
    if "ray" in sys.modules or _importable("ray"):
        result = invoke("tag", catalog, "--model", bundle, "--engine", "ray", "--previous", catalog,
                        "-o", tmp_path / "o.parquet")
        assert result.exit_code == 2 and "--previous is not supported with --engine ray" in result.stderr
    # Without Ray installed (the import fails): one line saying how to install it, exit 2, nothing written.
    monkeypatch.setitem(sys.modules, "ray", None)
    result = invoke("tag", catalog, "--model", bundle, "--engine", "ray", "-o", tmp_path / "o.parquet")
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == "error: --engine ray needs Ray: pip install -e '.[cpu,ray]' (or pip install " \
                                    "'ray[data]>=2.60,<2.64')"
    assert not (tmp_path / "o.parquet").exists()


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_actor_plans_and_catalog_files(tmp_path):
    """Pure functions of the engine: no Ray needed."""
    from xmctag.engines.ray_engine import catalog_files, plan_actors
    from xmctag.errors import UserError

    # (actors, CPUs each, GPUs each, ONNX Runtime threads)
    assert plan_actors("cpu", None, None, {"CPU": 2}, [2]) == (1, 2, 0, 2)  # this machine: one actor, both cores
    assert plan_actors("cpu", 2, None, {"CPU": 2}, [2]) == (2, 1, 0, 1)
    assert plan_actors("cpu", None, None, {"CPU": 12}, [6, 6]) == (2, 4, 0, 4)  # 4 CPUs each, on one node
    assert plan_actors("cuda", None, None, {"CPU": 16, "GPU": 2}, [8, 8]) == (2, 1, 1, None)  # one per GPU
    with pytest.raises(UserError, match="--actors 3: the Ray cluster has 2 CPUs"):
        plan_actors("cpu", 3, None, {"CPU": 2}, [2])
    with pytest.raises(UserError, match="--device cuda: the Ray cluster has no GPU"):
        plan_actors("cuda", None, None, {"CPU": 2}, [2])
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    for name in ("b.parquet", "a.parquet", ".hidden.parquet", "_SUCCESS"):
        (catalog / name).write_text("")
    (catalog / "sub").mkdir()
    (catalog / "sub" / "c.parquet").write_text("")
    assert [p.name for p in catalog_files(catalog)] == ["a.parquet", "b.parquet"]
    assert [p.name for p in catalog_files(f"{catalog}/b*.parquet")] == ["b.parquet"]
    assert catalog_files(catalog / "a.parquet") == [catalog / "a.parquet"]
    for missing, message in ((tmp_path / "nope", "no such file or directory"), (f"{catalog}/z*", "no file matches"),
                             (catalog / "sub" / "sub2", "no such file")):
        with pytest.raises(UserError, match=message):
            catalog_files(missing)
