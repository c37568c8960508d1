"""vision/cache and vision/embed: the embedding cache keyed on content and model, embedding a catalog's images once,
user errors, and the embed-images command."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import encoded, picture
from PIL import Image

from xmctag.errors import UserError
from xmctag.vision import fetch
from xmctag.vision import images as img
from xmctag.vision.cache import EmbeddingCache, SourceIndex
from xmctag.vision.embed import ImageFeatures, embed_images

LOCAL = ("127.0.0.1",)  # the test servers' address: loopback, refused unless allowed


# A timeout no local answer comes near, even on a loaded machine; the timeout test has its own short one.
FAST = img.FetchOptions(workers=4, timeout=10, retries=1, backoff=0.05, allowed_hosts=LOCAL)


def sha(i: int) -> str:
    return hashlib.sha256(f"content-{i}".encode()).hexdigest()


def test_embedding_cache_persists_and_keys_on_content_and_model(tmp_path):
    cache = EmbeddingCache(tmp_path, "model-a@1", dim=4)
    cache.add([sha(0), sha(1)], np.arange(8, dtype=np.float32).reshape(2, 4))
    cache.add([sha(2)], np.full((1, 4), 9.0))
    # Leftovers of a process that died mid-write are ignored.
    (cache.table.directory / ".123.keys.npy.abcd.tmp").write_bytes(b"half")
    np.save(cache.table.directory / "000-orphan.values.npy", np.zeros((3, 4), np.float32))

    reopened = EmbeddingCache(tmp_path, "model-a@1", dim=4)
    vectors, found = reopened.lookup([sha(1), sha(5), sha(2), sha(0)])
    assert found.tolist() == [True, False, True, True] and len(reopened) == 3
    np.testing.assert_array_equal(vectors[[0, 2, 3]], [[4, 5, 6, 7], [9, 9, 9, 9], [0, 1, 2, 3]])
    assert not vectors[1].any()
    assert not EmbeddingCache(tmp_path, "model-b@1", dim=4).lookup([sha(0)])[1].any()  # other model: miss
    assert not reopened.lookup([sha(99)])[1].any()  # other content: miss
    reopened.add([sha(0)], np.full((1, 4), -1.0))  # newest wins, before and after a reopen
    np.testing.assert_array_equal(reopened.lookup([sha(0)])[0], [[-1, -1, -1, -1]])
    np.testing.assert_array_equal(EmbeddingCache(tmp_path, "model-a@1", 4).lookup([sha(0)])[0], [[-1] * 4])
    with pytest.raises(UserError, match="expected"):
        EmbeddingCache(tmp_path, "model-a@1", dim=8)


def test_cache_entries_written_by_another_process_appear_after_refresh(tmp_path):
    import subprocess
    import sys

    cache = EmbeddingCache(tmp_path, "model-a@1", dim=2)
    code = ("import numpy as np, sys; from xmctag.vision.cache import EmbeddingCache; "
            "EmbeddingCache(sys.argv[1], 'model-a@1', 2).add([sys.argv[2]], np.ones((1, 2)))")
    subprocess.run([sys.executable, "-c", code, str(tmp_path), sha(42)], check=True, cwd=Path(__file__).parent.parent)
    assert not cache.lookup([sha(42)])[1].any()
    cache.refresh()
    assert cache.lookup([sha(42)])[1].all()


def test_source_index_remembers_latest_content(tmp_path):
    index = SourceIndex(tmp_path)
    index.record(["url:a", "url:b"], [sha(1), sha(2)])
    index.record(["url:b"], [None])  # b failed later: its old content is forgotten
    assert SourceIndex(tmp_path).lookup(["url:a", "url:b", "url:c"]) == [sha(1), None, None]


def test_embed_catalog_then_read_features(tmp_path, clip_encoder):
    (tmp_path / "img").mkdir()
    for i in range(3):
        (tmp_path / "img" / f"{i}.png").write_bytes(encoded(picture(20 + i)))
    catalog = pl.DataFrame({
        "id": ["p0", "p1", "p2", "p3", "p4", "p5"],
        "image": [["img/0.png"], ["img/1.png", "img/2.png"], ["img/missing.png"], None,
                  ["img/broken.png"], ["img/0.png"]],
    })
    (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG broken")
    catalog.write_parquet(tmp_path / "catalog.parquet")
    cache_dir = tmp_path / "cache"
    run = dict(image_col="image", encoder=clip_encoder, cache_dir=cache_dir, max_images=2, rows_per_batch=4,
               batch_size=2, workers=2)

    first = embed_images(tmp_path / "catalog.parquet", **run)
    assert (first.products, first.products_with_image, first.images, first.images_ok) == (6, 3, 6, 4)
    assert first.newly_embedded == 3 and first.failures == {"missing": 1, "undecodable": 1}
    assert "img/broken.png" in first.examples["undecodable"][0]
    second = embed_images(tmp_path / "catalog.parquet", **run)
    assert second.newly_embedded == 0 and second.cache_hits == 4 and second.failures == first.failures

    features = ImageFeatures(cache_dir, clip_encoder.model_id, clip_encoder.dim, tmp_path, max_images=2)
    vectors, mask = features.batch(catalog["image"].to_list())
    assert vectors.shape == (6, 2, 16) and vectors.dtype == np.float32
    assert mask.tolist() == [[1, 0], [1, 1], [0, 0], [0, 0], [0, 0], [1, 0]]
    expected = clip_encoder.embed([Image.open(tmp_path / "img" / "1.png").convert("RGB")])
    np.testing.assert_allclose(vectors[1, 0], expected[0], atol=1e-5)
    np.testing.assert_array_equal(vectors[5, 0], vectors[0, 0])
    assert not vectors[2:5].any()


def test_embed_catalog_of_urls_and_bytes_fetches_once(tmp_path, server, clip_encoder):
    catalog = pl.DataFrame({"image": [f"{server.url}/img/1.png", f"{server.url}/404", f"{server.url}/img/2.png",
                                      None]})
    catalog.write_parquet(tmp_path / "urls.parquet")
    pl.DataFrame({"image": [encoded(picture(1)), b"junk"]}, schema={"image": pl.Binary}).write_parquet(
        tmp_path / "bytes.parquet")
    run = dict(encoder=clip_encoder, cache_dir=tmp_path / "cache", fetch=FAST)
    first = embed_images(tmp_path / "urls.parquet", **run)
    assert (first.images_ok, first.newly_embedded, first.failures) == (2, 2, {"fetch_failed": 1})
    second = embed_images(tmp_path / "urls.parquet", **run)
    assert (second.images_ok, second.cache_hits, second.newly_embedded) == (2, 2, 0)
    assert server.hits["/img/1.png"] == 1  # known URL with a cached embedding: not downloaded again
    embed_images(tmp_path / "urls.parquet", refetch=True, **run)
    assert server.hits["/img/1.png"] == 2
    inline = embed_images(tmp_path / "bytes.parquet", **run)  # same picture as /img/1.png: already cached
    assert (inline.cache_hits, inline.newly_embedded, inline.failures) == (1, 0, {"undecodable": 1})
    features = ImageFeatures(tmp_path / "cache", clip_encoder.model_id, clip_encoder.dim, tmp_path)
    vectors, mask = features.batch(catalog["image"].to_list() + [encoded(picture(1))])
    assert mask[:, 0].tolist() == [1, 0, 1, 0, 1]
    np.testing.assert_array_equal(vectors[4], vectors[0])


def test_embed_images_user_errors(tmp_path, clip_encoder):
    pl.DataFrame({"id": ["a"]}).write_parquet(tmp_path / "c.parquet")
    with pytest.raises(UserError, match="missing image column"):
        embed_images(tmp_path / "c.parquet", encoder=clip_encoder, cache_dir=tmp_path / "cache")
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(UserError, match="not a readable Parquet"):
        embed_images(tmp_path / "bad.parquet", encoder=clip_encoder, cache_dir=tmp_path / "cache")


def test_an_unusable_cache_dir_is_a_user_error(tmp_path, clip_encoder):
    from xmctag.vision.tagging import resolve_cache_dir

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    pl.DataFrame({"image": [encoded(picture(1))]}).write_parquet(tmp_path / "c.parquet")
    with pytest.raises(UserError, match=f"^--cache-dir {blocker}: not a directory$"):
        embed_images(tmp_path / "c.parquet", encoder=clip_encoder, cache_dir=blocker)
    with pytest.raises(UserError, match=f"^--cache-dir {blocker}/c: cannot create it \\({blocker} is not a directory"):
        resolve_cache_dir(blocker / "c", None, None)  # xmctag tag --cache-dir
    with pytest.raises(UserError, match=f"^image cache {blocker}: not a directory"):
        EmbeddingCache(blocker, "model-a@1", dim=4)
    with pytest.raises(UserError, match=f"^image cache {blocker}: not a directory"):
        SourceIndex(blocker)


def test_a_column_without_any_usable_image_is_an_error_naming_it(tmp_path, tiny_models, monkeypatch,
                                                                  closed_port_urls):
    from typer.testing import CliRunner

    from xmctag.cli import app

    catalog = tmp_path / "cat.parquet"
    pl.DataFrame({"id": ["a", "b"], "text": ["colour: red", "acme red shirt"]}).write_parquet(catalog)
    result = CliRunner().invoke(app, ["embed-images", str(catalog), "--image-col", "text", "--vision",
                                      str(tiny_models["clip"]), "--cache-dir", str(tmp_path / "c"), "--quiet"])
    assert result.exit_code == 2, result.output
    # The reason once (it was printed twice), the value as written.
    assert ("none of the 2 values of column 'text' is a usable image (e.g. row 0: colour: red: unsupported: "
            "colour:// sources); is 'text' the image column?") in " ".join(result.output.split())
    # Unreachable URLs: the first few fail, the rest are skipped once the network is given up on.
    monkeypatch.setattr(fetch, "NETWORK_FAILURES_TO_GIVE_UP", 2)
    pl.DataFrame({"image": closed_port_urls(12)}).write_parquet(tmp_path / "urls.parquet")
    with pytest.warns(UserWarning, match="reached no server"), pytest.raises(UserError, match="column 'image'"):
        embed_images(tmp_path / "urls.parquet", encoder=str(tiny_models["clip"]), cache_dir=tmp_path / "c",
                     fetch=img.FetchOptions(workers=1, timeout=10, retries=0, allowed_hosts=LOCAL))


def test_embed_images_cli_counts_and_reuses_the_cache(tmp_path, tiny_models):
    from typer.testing import CliRunner

    from xmctag.cli import app

    catalog = tmp_path / "cat.parquet"
    pl.DataFrame({"id": ["a", "b", "c"], "image": [encoded(picture(1)), b"not an image", None]}).write_parquet(catalog)
    args = ["embed-images", str(catalog), "--vision", str(tiny_models["clip"]), "--cache-dir", str(tmp_path / "c"),
            "--quiet"]
    first = CliRunner().invoke(app, args, catch_exceptions=False)
    assert first.exit_code == 0, first.output
    assert "1 ok (0 cached, 1 newly embedded)" in first.output and "1 images undecodable" in first.output
    second = CliRunner().invoke(app, args, catch_exceptions=False)
    assert "1 ok (1 cached, 0 newly embedded)" in second.output
    missing = CliRunner().invoke(app, ["embed-images", str(tmp_path / "nope.parquet"), "--quiet"])
    assert missing.exit_code == 2 and "nope.parquet" in missing.output
