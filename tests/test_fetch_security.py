"""The image fetcher treats catalogs as untrusted (xmctag.vision.fetch, xmctag.vision.netguard).

Files: only regular files, never more than max_bytes, without ever blocking. URLs: a total deadline, redirects only
to http(s) and at most 5, no loopback / private / link-local / ... address unless allowed (``allowed_hosts``, the
``--image-hosts`` option), checked on the address actually connected to. URLs are served by local servers on
127.0.0.1; how a "public" host is simulated is said in each test. Whatever could hang runs under ``within``, so a
regression fails the test instead of hanging the suite.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
from conftest import encoded, picture
from typer.testing import CliRunner

from xmctag.errors import UserError
from xmctag.vision import images as img

LOCAL = ("127.0.0.1",)
PNG = encoded(picture(1))
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


class Server:
    """``/img.png``; ``/redirect?to=URL`` (302); ``/chain/N`` (N redirects, then the picture); ``/drip-body`` and
    ``/drip-head`` (one byte every 0.3 s of the body or of the status line). As a proxy it serves the absolute URLs
    it is asked for the same way. ``hits``: requests per path; ``connections``: TCP connections accepted."""

    def __init__(self):
        self.hits: dict[str, int] = {}
        self.connections = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def setup(self):
                server.connections += 1
                super().setup()

            def do_GET(self):
                url = urllib.parse.urlsplit(self.path)
                server.hits[url.path] = server.hits.get(url.path, 0) + 1
                try:
                    if url.path == "/redirect":
                        return self.reply(302, b"", Location=urllib.parse.parse_qs(url.query)["to"][0])
                    if url.path.startswith("/chain/"):
                        n = int(url.path.rsplit("/", 1)[1])
                        return self.reply(302, b"", Location=f"/chain/{n - 1}") if n else self.reply(200, PNG)
                    if url.path == "/drip-body":
                        self.send_response(200)
                        self.send_header("Content-Length", "40")
                        self.end_headers()
                        return self.drip(b"x" * 40)
                    if url.path == "/drip-head":
                        return self.drip(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx")
                    return self.reply(200, PNG)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up
                    pass

            def reply(self, code: int, body: bytes, **headers):
                self.send_response(code)
                for name, value in {"Content-Length": str(len(body)), **headers}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def drip(self, data: bytes):
                self.wfile.flush()
                for byte in data:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.3)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def server(monkeypatch):
    for name in ("NO_PROXY", "no_proxy"):  # a proxy configured on the machine must not see the local server
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    s = Server()
    yield s
    s.close()


# ---------------------------------------------------------------------------------------------------------------
# Files


def test_devices_are_refused_without_being_read(tmp_path):
    # In a child process with 1 GiB of address space: reading /dev/zero fails there, not on the machine.
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30)); "
            "from xmctag.vision import images as img; "
            "print([p.status for p in img.load_images(sys.argv[2:], sys.argv[1], decode=False)])")
    values = ["file:///dev/zero", "/dev/zero", "zero.png", "/dev/null"]
    child = subprocess.run([sys.executable, "-c", code, str(tmp_path), *values], capture_output=True, text=True,
                           check=False, timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert child.returncode == 0, child.stderr[-2000:]
    assert child.stdout.strip() == repr([NOT_REGULAR] * len(values))


def test_fifos_and_directories_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # no writer: opening it for reading blocks forever unless non-blocking
    (tmp_path / "folder.png").mkdir()
    values = [fifo.as_uri(), str(fifo), "pipe.png", "folder.png"]
    try:
        products = within(10, img.load_images, values, tmp_path, 1, False, img.FetchOptions(workers=2))
    finally:  # a reader blocked in open() (a regression) gets a writer and EOF, so the process can exit
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # no reader: nothing blocked
            pass
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


# ---------------------------------------------------------------------------------------------------------------
# URLs: deadline, redirects


@pytest.mark.parametrize("path", ["/drip-body", "/drip-head"])
def test_a_dripping_server_is_cut_off_at_the_deadline(server, path):
    # Each byte comes well within the 0.5 s timeout of one read: only a deadline on the whole URL stops it.
    options = img.FetchOptions(timeout=0.5, retries=2, backoff=0.05, deadline=1.0, allowed_hosts=LOCAL)
    start = time.perf_counter()
    status, _ = within(30, read, server.url + path, options)
    elapsed = time.perf_counter() - start
    assert status == "fetch_failed: deadline exceeded"
    assert 0.9 < elapsed < 2.0


def test_redirects_only_to_http_and_at_most_five(server):
    options = img.FetchOptions(timeout=0.5, retries=0, allowed_hosts=LOCAL)
    with socket.socket() as ftp:  # where an FTP redirect would lead: nothing may connect to it
        ftp.bind(("127.0.0.1", 0))
        ftp.listen()
        ftp.setblocking(False)
        status, _ = within(10, read, f"{server.url}/redirect?to=ftp://127.0.0.1:{ftp.getsockname()[1]}/x.png",
                           options)
        assert status == "fetch_failed: redirect to ftp refused"
        with pytest.raises(BlockingIOError):
            ftp.accept()
    assert read(f"{server.url}/redirect?to=file:///etc/hostname", options)[0] == "fetch_failed: redirect to file " \
                                                                                 "refused"
    assert read(f"{server.url}/chain/5", options) == ("ok", PNG)
    assert read(f"{server.url}/chain/6", options)[0] == "fetch_failed: more than 5 redirects"


# ---------------------------------------------------------------------------------------------------------------
# URLs: where they may go


def test_private_addresses_are_refused_by_default_and_allowed_by_the_setting(server):
    fast = {"timeout": 0.5, "retries": 0}
    assert read(f"{server.url}/img.png", img.FetchOptions(**fast)) == (
        "fetch_failed: loopback address 127.0.0.1 refused (not in image hosts)", None)
    assert server.connections == 0  # refused before connecting
    for url, kind in [("http://169.254.169.254/latest/meta-data/", "link-local address 169.254.169.254"),
                      ("http://10.1.2.3/a.png", "private address 10.1.2.3"),
                      ("https://192.168.0.1/a.png", "private address 192.168.0.1"),
                      ("http://0.0.0.0/a.png", "unspecified address 0.0.0.0"),
                      ("http://[::1]/a.png", "loopback address ::1"),
                      ("http://[fe80::1]/a.png", "link-local address fe80::1"),
                      ("http://[fd00::1]/a.png", "private address fd00::1"),
                      (f"http://[::ffff:127.0.0.1]:{server.port}/a.png", "loopback address 127.0.0.1")]:
        assert within(10, read, url, img.FetchOptions(**fast))[0] == f"fetch_failed: {kind} refused (not in image " \
                                                                      "hosts)", url
    for allowed in [("127.0.0.1",), ("10.0.0.0/8", "127.0.0.0/8"), ("::ffff:127.0.0.1",)]:
        assert read(f"{server.url}/img.png", img.FetchOptions(**fast, allowed_hosts=allowed)) == ("ok", PNG)
    for allowed in [("localhost",), (".localhost", "localhost")]:  # a name allows whatever it resolves to
        assert read(f"http://localhost:{server.port}/img.png", img.FetchOptions(**fast, allowed_hosts=allowed)) == (
            "ok", PNG)


def test_a_redirect_from_an_allowed_host_to_a_loopback_address_is_refused(server):
    # "localhost", allowed by name, stands for a public host; it redirects to the same server by a loopback address
    # that is not allowed, so only the rule can refuse the redirect.
    options = img.FetchOptions(timeout=0.5, retries=0, allowed_hosts=("localhost",))
    start = f"http://localhost:{server.port}/redirect?to="
    assert read(start + f"http://localhost:{server.port}/img.png", options) == ("ok", PNG)
    for target, address in [(server.url, "127.0.0.1"), (f"http://[::1]:{server.port}", "::1"),
                            ("http://169.254.169.254", "169.254.169.254")]:
        status, _ = within(10, read, f"{start}{target}/img.png", options)
        kind = "link-local" if address.startswith("169") else "loopback"
        assert status == f"fetch_failed: redirect to {kind} address {address} refused (not in image hosts)"
    assert server.hits["/img.png"] == 1  # only the allowed fetch


@pytest.fixture()
def public_name(monkeypatch):
    """``images.example.com`` resolves to a public address (8.8.8.8) whose connections the local network routes to
    ``port`` on 127.0.0.1 (as a NAT or a transparent proxy would), and ``rebound.example.com`` straight to 127.0.0.1."""
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect
    target = {}

    def getaddrinfo(host, port, *args, **kwargs):
        address = {"images.example.com": "8.8.8.8", "rebound.example.com": "127.0.0.1"}.get(host)
        if address is None:
            return real_getaddrinfo(host, port, *args, **kwargs)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    def connect(sock, address):
        if address[0] == "8.8.8.8":
            address = ("127.0.0.1", target["port"])
        return real_connect(sock, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    return target


def test_names_are_checked_by_their_addresses_and_the_peer_connected_to(server, public_name):
    public_name["port"] = server.port
    options = img.FetchOptions(timeout=0.5, retries=0)
    # A name that resolves to a loopback address: refused before connecting, unless the name is allowed.
    assert read(f"http://rebound.example.com:{server.port}/img.png", options)[0] == (
        "fetch_failed: loopback address 127.0.0.1 refused (not in image hosts)")
    assert server.connections == 0
    for allowed in [("rebound.example.com",), ("*.example.com",)]:
        assert read(f"http://rebound.example.com:{server.port}/img.png", img.FetchOptions(
            timeout=0.5, retries=0, allowed_hosts=allowed)) == ("ok", PNG)
    # A public address that lands on a loopback peer: the socket's peer is checked, no request is sent.
    assert read(f"http://images.example.com:{server.port}/img.png", options)[0] == (
        "fetch_failed: loopback address 127.0.0.1 refused (not in image hosts)")
    assert server.hits["/img.png"] == 2  # the two allowed fetches only


def test_behind_a_proxy_the_url_host_is_checked_by_its_resolved_addresses(server, public_name, monkeypatch):
    # The local server is the proxy (on a loopback address, trusted as configured: the peer is not checked).
    for name in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("http_proxy", server.url)
    public_name["port"] = server.port  # where a direct connection to images.example.com would land
    options = img.FetchOptions(timeout=0.5, retries=0)
    assert read("http://images.example.com/img.png", options) == ("ok", PNG)  # public by its resolved address
    assert server.hits == {"/img.png": 1}
    for url, why in [("http://10.1.2.3/img.png", "private address 10.1.2.3"),
                     ("http://rebound.example.com/img.png", "loopback address 127.0.0.1"),
                     ("http://nowhere.invalid/img.png",
                      "host nowhere.invalid (behind a proxy, and not resolvable here)")]:
        assert within(10, read, url, options)[0] == f"fetch_failed: {why} refused (not in image hosts)", url
    assert server.hits == {"/img.png": 1}  # none of them reached the proxy
    assert read("http://rebound.example.com/img.png", img.FetchOptions(
        timeout=0.5, retries=0, allowed_hosts=("rebound.example.com",))) == ("ok", PNG)


def test_address_kinds_and_allowed_host_entries():
    import ipaddress

    from xmctag.vision.netguard import HostPolicy, restricted_kind

    kinds = {"8.8.8.8": None, "2606:4700:4700::1111": None, "127.0.0.2": "loopback", "10.0.0.1": "private",
             "172.16.5.4": "private", "192.168.1.1": "private", "100.64.0.1": "non-public",
             "169.254.169.254": "link-local", "224.0.0.1": "multicast", "240.0.0.1": "reserved",
             "0.0.0.0": "unspecified", "::": "unspecified", "::1": "loopback", "fe80::1": "link-local",
             "fc00::1": "private", "ff02::1": "multicast", "::ffff:10.0.0.1": "private", "::ffff:8.8.8.8": None,
             "2002:7f00:1::": "loopback", "64:ff9b::a9fe:a9fe": "link-local"}
    assert {a: restricted_kind(ipaddress.ip_address(a)) for a in kinds} == kinds
    policy = HostPolicy(["Images.Corp.Example.", ".cdn.example", "*.img.example", "10.20.0.0/16", "[::1]",
                         "192.168.7.7"])
    assert policy.refusal("images.corp.example", "10.9.9.9") is None
    assert policy.refusal("a.b.cdn.example", "10.9.9.9") is None and policy.refusal("x.img.example", "::1") is None
    assert policy.refusal("other.example", "10.20.3.4") is None and policy.refusal("x", "::ffff:10.20.0.1") is None
    assert policy.refusal("x", "192.168.7.7") is None and policy.refusal("x", "::1") is None
    assert policy.refusal("cdn.example.evil", "10.9.9.9") == "private address 10.9.9.9"
    assert policy.refusal("x", "8.8.8.8") is None
    for bad in ["http://images.corp", "10.0.0.0/33", "images corp", "host:8080", ""]:
        with pytest.raises(UserError, match="is not a host name, IP address or network"):
            HostPolicy([bad])
    with pytest.raises(UserError, match="'a/b'"):
        img.FetchOptions(allowed_hosts=["a/b"])


# ---------------------------------------------------------------------------------------------------------------
# The setting reaches the fetcher: CLI and API


def test_image_hosts_option_of_embed_images_reaches_the_fetcher(tmp_path, server, tiny_models):  # noqa: F811
    from xmctag.cli import app

    catalog = tmp_path / "cat.parquet"
    pl.DataFrame({"image": [f"{server.url}/img.png"]}).write_parquet(catalog)
    args = ["embed-images", str(catalog), "--vision", str(tiny_models["clip"]), "--cache-dir", str(tmp_path / "c"),
            "--quiet"]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2, refused.output
    assert "loopback address 127.0.0.1 refused (not in image hosts)" in " ".join(refused.output.split())
    assert server.connections == 0
    allowed = CliRunner().invoke(app, args + ["--image-hosts", "images.corp.example, 127.0.0.0/8"],
                                 catch_exceptions=False)
    assert allowed.exit_code == 0, allowed.output
    assert "1 ok (0 cached, 1 newly embedded)" in allowed.output and server.hits == {"/img.png": 1}
    bad = CliRunner().invoke(app, args + ["--image-hosts", "http://images.corp"])
    assert bad.exit_code == 2 and "'http://images.corp' is not a host name" in " ".join(bad.output.split())


def test_image_hosts_option_of_tag_and_train(tmp_path, monkeypatch):
    from xmctag.cli import app
    from xmctag.tagger import Tagger
    from xmctag.training import trainer

    seen = {}

    def capture(*args, **kwargs):
        seen.update(kwargs)
        raise UserError("captured")

    monkeypatch.setattr(trainer, "train", capture)
    result = CliRunner().invoke(app, ["train", "--train", "t.parquet", "--labels", "l.parquet", "--out",
                                      str(tmp_path / "run"), "--image-hosts", "10.0.0.0/8,images.corp"])
    assert "captured" in result.output and seen["image_hosts"] == ("10.0.0.0/8", "images.corp")
    monkeypatch.setattr(Tagger, "load", classmethod(lambda cls, *a, **k: SimpleNamespace(tag_file=capture)))
    result = CliRunner().invoke(app, ["tag", "c.parquet", "--model", str(tmp_path), "--image-hosts", "::1"])
    assert "captured" in result.output and seen["image_hosts"] == ("::1",)
    # Tagger.images -> BundleImages -> FetchOptions
    fake = SimpleNamespace(path=tmp_path, bundle=None, device="cpu",
                           fusion={"max_images": 1, "vision_dim": 4, "model_id": "m"})
    assert Tagger.images(fake, tmp_path / "c", None, 2, ("::1",)).options.allowed_hosts == ("::1",)


class _Encoder:
    model_id, dim = "test-model", 4

    def embed(self, pictures, batch_size=32):
        return np.ones((len(pictures), self.dim), np.float32)


def test_tagging_fetches_urls_by_the_setting(tmp_path, server):
    from xmctag.vision.tagging import BundleImages

    fusion = {"max_images": 1, "vision_dim": 4, "model_id": "test-model"}
    url = f"{server.url}/img.png"
    for hosts, used in [((), 0), (LOCAL, 1)]:
        images = BundleImages(tmp_path, fusion, tmp_path / f"cache{used}", workers=2, image_hosts=hosts)
        images.encoder = _Encoder()
        _, mask = images.features([url], tmp_path)
        assert (int(mask.sum()), images.counts.used) == (used, used)
    assert images.counts.examples == {}
    assert server.hits == {"/img.png": 1}


def test_training_fetches_urls_by_the_setting(tmp_path, server, tiny_models):  # noqa: F811
    import torch

    from xmctag.config import Config
    from xmctag.progress import Progress
    from xmctag.training.images import prepare_images

    config = Config(vision=str(tiny_models["clip"]), image_cache_dir=str(tmp_path / "cache"))
    sets = {"train": (tmp_path / "train.parquet", [f"{server.url}/img.png"])}
    with pytest.raises(UserError, match=r"loopback address 127.0.0.1 refused \(not in image hosts\)"):
        prepare_images(config, tmp_path, sets, torch.device("cpu"), Progress(False))
    fusion, _ = prepare_images(config, tmp_path, sets, torch.device("cpu"), Progress(False), image_hosts=LOCAL)
    assert fusion["images"]["train"]["ok"] == 1 and server.hits == {"/img.png": 1}
