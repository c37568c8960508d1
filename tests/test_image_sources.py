"""vision/images and vision/fetch: every kind of image reference, local files with bad ones reported, URLs with
retries, timeouts and failures (a local HTTP server on 127.0.0.1), giving up after network failures in a row."""

from __future__ import annotations

import hashlib
import time

import numpy as np
from conftest import encoded, picture
from PIL import Image

from xmctag.vision import fetch
from xmctag.vision import images as img

LOCAL = ("127.0.0.1",)  # the test servers' address: loopback, refused unless allowed
# A timeout no local answer comes near, even on a loaded machine; the timeout test has its own short one.
FAST = img.FetchOptions(workers=4, timeout=10, retries=1, backoff=0.05, allowed_hosts=LOCAL)


def test_sources_of_every_value_kind(tmp_path):
    data = encoded(picture(1))
    sources = img.sources_of([None, data, "a/b.jpg", "/abs/c.png", "file:///abs/d.webp", "https://x.org/e.jpg",
                              {"bytes": None, "path": "f.png"}, "s3://bucket/g.jpg", "  "], tmp_path, max_images=10)
    assert [(s.kind, s.ref) for s in sources] == [
        ("bytes", f"<{len(data)} bytes>"), ("file", str(tmp_path / "a/b.jpg")), ("file", "/abs/c.png"),
        ("file", "/abs/d.webp"), ("url", "https://x.org/e.jpg"), ("file", str(tmp_path / "f.png")),
        ("invalid", "s3://bucket/g.jpg")]
    assert img.read_source(sources[-1]) == (None, "unsupported: s3:// sources")
    assert img.sources_of(None, tmp_path) == [] and img.sources_of("", tmp_path) == []
    assert len(img.sources_of(["a.png", "b.png", "c.png"], tmp_path, max_images=2)) == 2
    assert img.sources_of({"bytes": data, "path": "ignored.png"}, tmp_path)[0].data == data
    assert [s.ref for s in img.sources_of(np.array(["a.png", None], dtype=object), "/x", 5)] == ["/x/a.png"]


def test_load_local_images_and_report_bad_ones(tmp_path):
    (tmp_path / "pics").mkdir()
    jpeg, webp = encoded(picture(2), "JPEG"), encoded(picture(3), "WEBP")
    (tmp_path / "pics" / "a.jpg").write_bytes(jpeg)
    (tmp_path / "b.webp").write_bytes(webp)
    transparent = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red: must come out white
    values = [
        "pics/a.jpg",                                   # relative to the catalog directory
        (tmp_path / "b.webp").as_uri(),                 # file:// URI
        encoded(transparent),                           # raw bytes
        b"\x89PNG\r\n\x1a\n-this-is-not-a-real-png",    # corrupt bytes
        "pics/nope.jpg",                                # missing file
        None,
        ["pics/nope.jpg", "pics/a.jpg", "b.webp"],      # list column: first 2 of them
    ]
    products = img.load_images(values, tmp_path, max_images=2, options=FAST)
    assert [p.status for p in products] == ["ok", "ok", "ok", "undecodable", "missing", "null", "ok"]
    first = products[0].slots[0]
    assert first.sha256 == hashlib.sha256(jpeg).hexdigest() and first.image.mode == "RGB"
    assert first.image.size == (24, 18)
    assert products[1].slots[0].sha256 == hashlib.sha256(webp).hexdigest()
    assert np.asarray(products[2].images[0]).min() == 255
    assert [s.status for s in products[6].slots] == ["missing", "ok"] and len(products[6].images) == 1
    assert products[6].slots[1].sha256 == first.sha256
    undecoded = img.load_images(values[:1], tmp_path, decode=False)[0].slots[0]
    assert undecoded.image is None and undecoded.data == jpeg and undecoded.ok


def test_fetch_urls_with_retries_timeouts_and_failures(server):
    values = [f"{server.url}/img/1.png", f"{server.url}/404", f"{server.url}/slow", f"{server.url}/flaky",
              f"{server.url}/garbage", [f"{server.url}/img/1.png", f"{server.url}/img/2.png"]]
    options = img.FetchOptions(workers=4, timeout=0.3, retries=1, backoff=0.05, allowed_hosts=LOCAL)
    start = time.perf_counter()
    products = img.load_images(values[2:3], ".", options=options)  # /slow never answers: a timeout, retried once
    assert time.perf_counter() - start < 30  # gave up (a hang would wait for the server's close)
    assert products[0].slots[0].status == "fetch_failed: timeout"
    wait_for(lambda: server.hits.get("/slow") == 2)  # the first attempt and one retry reached the server
    values.remove(f"{server.url}/slow")  # the others, with a timeout that no answer of this server comes near
    products = img.load_images(values, ".", max_images=2, options=FAST)
    assert [p.slots[0].status for p in products] == ["ok", "fetch_failed: HTTP 404", "ok", "undecodable", "ok"]
    assert products[0].slots[0].sha256 == hashlib.sha256(encoded(picture(1))).hexdigest()
    assert server.hits["/404"] == 1  # a 404 is final: no retry
    assert server.hits["/flaky"] == 2  # a 500 is retried
    assert server.hits["/img/1.png"] == 1  # the same URL in two products is fetched once
    assert server.hits["/slow"] == 2
    assert len(products[4].images) == 2


def wait_for(condition, seconds: float = 10.0) -> None:
    """Waits until ``condition()`` holds (the server records a request on its own thread); fails after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def test_fetching_stops_after_network_failures_in_a_row(monkeypatch, closed_port_urls):
    import warnings

    monkeypatch.setattr(fetch, "NETWORK_FAILURES_TO_GIVE_UP", 3)
    # A refused connection fails at once; the long timeout only makes sure that a machine under load never turns a
    # refusal into a timeout.
    options = img.FetchOptions(workers=2, timeout=10, retries=1, backoff=0.01, allowed_hosts=LOCAL)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        products = img.load_images(closed_port_urls(30), ".", decode=False, options=options)
    statuses = [p.slots[0].status for p in products]
    failed = [s for s in statuses if s.startswith("fetch_failed")]
    # The third failure in a row closes the gate; the one other worker may have been mid-fetch then (its URL fails,
    # or is skipped if it was waiting to retry). URLs start in order, none after the gate closed.
    assert 3 <= len(failed) <= 3 + options.workers - 1, statuses
    assert max(i for i, s in enumerate(statuses) if s.startswith("fetch_failed")) < 3 + options.workers - 1, statuses
    assert statuses.count(img.NETWORK_SKIPPED) == 30 - len(failed)
    reasons = {s.split(": ", 1)[1] for s in failed}
    assert len(reasons) == 1 and "refused" in next(iter(reasons)), reasons
    assert [str(w.message) for w in caught if "reached no server" in str(w.message)] == [
        f"image URLs: 3 in a row reached no server (last: {next(iter(reasons))}); not fetching the others "
        "of this run (counted as 'skipped: network unavailable')"]
    # An answer from a server, even an error, starts the count again.
    gate = img.NetworkGate()
    for reached in (False, False, True, False, False):
        gate.record(reached)
    assert not gate.closed and gate.failures_in_a_row == 2
