"""The image fetcher treats catalogs as untrusted (xmctag.vision.fetch).

Files: only regular files, never more than max_bytes, without ever blocking. Whatever could hang runs under
``within``, so a regression fails the test instead of hanging the suite.
"""

from __future__ import annotations

import os
import threading

import pytest

from xmctag.vision import images as img

NOT_REGULAR = "fetch_failed: not a regular file"


def within(seconds: float, fn, *args):
    """``fn(*args)`` in a daemon thread: its result, or a failed test if it is still running after ``seconds``."""
    result: dict = {}

    def run():
        try:
            result["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            result["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    if "error" in result:
        raise result["error"]
    return result["value"]


def read(value, options=None, base_dir="."):
    """The status of one image value (and its bytes), read without decoding."""
    slot = img.load_images([value], base_dir, decode=False, options=options or img.FetchOptions())[0].slots[0]
    return slot.status, slot.data


# ---------------------------------------------------------------------------------------------------------------
# Files


def test_devices_fifos_and_directories_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # no writer: opening it for reading blocks forever unless non-blocking
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    (tmp_path / "folder.png").mkdir()
    values = ["file:///dev/zero", "/dev/zero", fifo.as_uri(), "pipe.png", "zero.png", "folder.png"]
    products = within(10, img.load_images, values, tmp_path, 1, False, img.FetchOptions(workers=2))
    assert [p.status for p in products] == [NOT_REGULAR] * len(values)


def test_files_are_read_up_to_max_bytes_whatever_their_size_says(tmp_path):
    (tmp_path / "exact.png").write_bytes(b"x" * 100)
    (tmp_path / "big.png").write_bytes(b"x" * 101)
    options = img.FetchOptions(max_bytes=100)
    assert read("exact.png", options, tmp_path) == ("ok", b"x" * 100)
    assert read("big.png", options, tmp_path) == ("fetch_failed: file larger than 100 bytes", None)
    # /proc files say size 0 but have content: read up to the cap, not by the size.
    proc = "/proc/self/status"
    if not os.path.exists(proc) or os.stat(proc).st_size != 0:
        pytest.skip("no /proc")
    assert within(10, read, proc, options) == ("fetch_failed: file larger than 100 bytes", None)
    assert within(10, read, proc, img.FetchOptions(max_bytes=1 << 20))[0] == "ok"
